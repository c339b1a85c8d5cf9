"""Small factories for policy tests (like vLLM's ``create_requests`` / ``create_scheduler``): build request
states and snapshots without an engine. Standard library only, so the vLLM plug-in's tests can use them."""

from __future__ import annotations

from collections.abc import Sequence

from tempo.scheduler.bounds import BoundLadder
from tempo.scheduler.interface import EngineLimits, EngineTiming, JobInfo, Phase, RequestState, Snapshot
from tempo.scheduler.slo import SLO, SLOClass


def make_limits(
    *,
    token_budget: int = 2048,
    max_running: int = 256,
    kv_blocks_total: int = 10_000,
    kv_blocks_free: int | None = None,
    block_size: int = 16,
    swap_blocks_free: int = 0,
) -> EngineLimits:
    return EngineLimits(
        token_budget=token_budget,
        max_running=max_running,
        kv_blocks_total=kv_blocks_total,
        kv_blocks_free=kv_blocks_total if kv_blocks_free is None else kv_blocks_free,
        block_size=block_size,
        swap_blocks_free=swap_blocks_free,
    )


def make_timing(step_s: float = 0.03, *, swap_s_per_block: float | None = None) -> EngineTiming:
    """A cost model roughly like an 8B model on an A100."""
    return EngineTiming(
        base_s=0.01,
        per_seq_s=5e-5,
        per_kv_token_s=7e-8,
        per_prefill_token_s=7e-6,
        recent_step_s=step_s,
        swap_s_per_block=swap_s_per_block,
        recompute_s_per_token=7e-5,
    )


def make_slo(slo_class: SLOClass | str, tier: float = 1.0) -> SLO:
    cls = SLOClass(slo_class)
    if cls is SLOClass.LATENCY:
        return SLO.latency().scaled(tier)
    if cls is SLOClass.DEADLINE:
        return SLO.deadline().scaled(tier)
    if cls is SLOClass.COMPOUND:
        return SLO.compound(40.0).scaled(tier)
    return SLO.best_effort()


def make_state(
    request_id: str,
    slo_class: SLOClass | str = SLOClass.LATENCY,
    *,
    arrival_s: float = 0.0,
    prompt_tokens: int = 100,
    generated: int = 0,
    phase: Phase = Phase.WAITING,
    bound: int | BoundLadder = 200,
    tier: float = 1.0,
    slo: SLO | None = None,
    block_size: int = 16,
    job: JobInfo | None = None,
    demoted: bool = False,
    priority: int = 0,
) -> RequestState:
    """A request state; resident (``Phase.RUNNING``) ones hold the KV of their prompt and output so far."""
    cls = SLOClass(slo_class)
    ladder = bound if isinstance(bound, BoundLadder) else BoundLadder.fixed(bound)
    resident = phase is Phase.RUNNING
    computed = prompt_tokens + generated - 1 if resident and generated else (prompt_tokens if resident else 0)
    if cls is SLOClass.COMPOUND and job is None:
        job = JobInfo(f"job-{request_id}", 0, arrival_s)
    return RequestState(
        request_id=request_id,
        slo=slo or make_slo(cls, tier),
        arrival_s=arrival_s,
        prompt_tokens=prompt_tokens,
        ladder=ladder,
        phase=phase,
        generated=generated,
        computed_tokens=computed,
        kv_blocks=-(-computed // block_size) if resident or phase is Phase.SWAPPED else 0,
        app="test",
        first_token_s=arrival_s + 0.1 if generated else None,
        per_token_s=None,
        priority=priority,
        max_tokens=None,
        job=job,
        demoted=demoted,
        preemptions=0,
    )


def make_snapshot(
    states: Sequence[RequestState],
    *,
    now_s: float = 1.0,
    limits: EngineLimits | None = None,
    timing: EngineTiming | None = None,
) -> Snapshot:
    """A snapshot in the engine's order (residents, swapped, waiting by arrival); KV free = total - held."""
    limits = limits or make_limits()
    held = sum(s.kv_blocks for s in states if s.phase is Phase.RUNNING)
    limits = EngineLimits(
        token_budget=limits.token_budget,
        max_running=limits.max_running,
        kv_blocks_total=limits.kv_blocks_total,
        kv_blocks_free=max(0, min(limits.kv_blocks_free, limits.kv_blocks_total - held)),
        block_size=limits.block_size,
        swap_blocks_free=limits.swap_blocks_free,
    )
    order = {Phase.RUNNING: 0, Phase.SWAPPED: 1, Phase.WAITING: 2}
    ordered = sorted(states, key=lambda s: (order[s.phase], s.arrival_s if s.phase is not Phase.RUNNING else 0.0))
    return Snapshot(now_s, tuple(ordered), limits, timing or make_timing(), step=1)
