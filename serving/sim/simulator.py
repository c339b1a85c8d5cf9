"""Discrete-event simulation of a continuous-batching LLM engine driven by a scheduling policy.

The engine mirrors vLLM v1's loop (``EngineCore.step``: schedule, execute, update) with chunked prefill
as Sarathi-Serve, a paged KV cache of fixed capacity (blocks of ``block_size`` tokens), preemption by
recompute (drop the KV, prefill prompt + output again) or swap (copy the KV over PCIe and back), and an
iteration time from an engine profile: ``t = f(prefill tokens, decode sequences, KV tokens)``
(``tempo.serving.profiles.profile``). It replays a workload file: compound calls are released when the calls
they depend on finish. The true output length is the engine's alone: the policy sees bounds.

Events sit in one heap keyed ``(time, kind rank, sequence)``: at equal times arrivals are handled before
a step ends, so the next step sees them. Randomness (optional step-time noise) comes from an injected
generator; nothing is global, so the same inputs give the same run.
"""

from __future__ import annotations

import heapq
import time
from collections import defaultdict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from tempo.scheduler.bounds import BoundLadder
from tempo.scheduler.goodput import RequestOutcome
from tempo.scheduler.interface import (
    Decision,
    EngineLimits,
    EngineTiming,
    JobInfo,
    Phase,
    Policy,
    PreemptMode,
    RequestState,
    Snapshot,
    check_decision,
    victim_order,
)
from tempo.scheduler.planning import WATERMARK_FRACTION
from tempo.scheduler.step_rules import plan_step
from tempo.serving.profiles.profile import Profile
from tempo.serving.workloads.format import WorkloadRequest

ARRIVAL, STEP_END = 0, 1  # event kind ranks: arrivals first at equal times
RECENT_STEPS = 16  # steps in the measured step-time average the policy sees


class PolicyError(RuntimeError):
    """A policy broke the contract (a bad decision, or nothing runnable while work waits)."""


def engine_timing(profile: Profile) -> EngineTiming:
    """The linear cost model a policy sees, derived from the profile (a real engine would fit it to its
    measured steps): base step, per extra token, per cached token read, per prefill token."""
    base = profile.step_time(0, 1, 1)
    per_seq = (profile.step_time(0, 256, 256) - base) / 255
    per_kv = (profile.step_time(0, 1, 100_001) - profile.step_time(0, 1, 1)) / 100_000
    chunk, ctx = 512, 1024
    prefill = profile.step_time(chunk, 0, 0, chunk * (ctx + (chunk + 1) / 2), ctx + chunk, sampled=0)
    per_prefill = max(0.0, (prefill - base) / chunk - per_seq)
    budget = profile.engine.token_budget
    return EngineTiming(
        base_s=base,
        per_seq_s=per_seq,
        per_kv_token_s=per_kv,
        per_prefill_token_s=per_prefill,
        swap_s_per_block=profile.swap_time(1) if profile.engine.swap_blocks > 0 else None,
        recompute_s_per_token=profile.prefill_time(budget) / budget,
    )


class _Job:
    __slots__ = ("arrival_s", "calls", "done_tokens", "failed", "finished", "histories", "job_id", "stage_calls",
                 "stage_prompts")

    def __init__(self, job_id: str, arrival_s: float) -> None:
        self.job_id = job_id
        self.arrival_s = arrival_s
        self.calls: list[_Req] = []
        self.done_tokens = 0
        self.failed = False
        self.stage_calls: dict[int, int] = defaultdict(int)
        self.stage_prompts: dict[int, list[int]] = defaultdict(list)
        self.finished: dict[int, list[tuple[int, int]]] = defaultdict(list)  # stage -> (prompt, output) of done calls
        self.histories: dict[int, tuple[tuple[tuple[int, int], ...], ...]] = {}  # stage -> the stages before it

    def info(self, stage: int) -> JobInfo:
        """What a policy may know of this job for a call of ``stage``: the finished earlier stages (fixed once
        the stage is released, since every call of a stage waits for every call of the one before)."""
        history = self.histories.get(stage)
        if history is None:
            history = self.histories[stage] = tuple(tuple(self.finished[s]) for s in sorted(self.finished) if s < stage)
        return JobInfo(self.job_id, stage, self.arrival_s, self.stage_calls[stage], self.done_tokens, history,
                       tuple(self.stage_prompts[stage]))


class _Req:
    """Engine-side mutable state of one request (the policy sees an immutable RequestState)."""

    __slots__ = (
        "app",
        "arrival_s",
        "blocks",
        "computed",
        "demoted",
        "dependents",
        "deps_left",
        "finished",
        "first_s",
        "generated",
        "id",
        "job",
        "ladder",
        "max_tokens",
        "pace_owed",
        "pace_rate",
        "phase",
        "preemptions",
        "prompt",
        "rejected",
        "released",
        "slo",
        "stage",
        "state",
        "times",
        "true_len",
        "used",
    )

    def __init__(self, w: WorkloadRequest, ladder: BoundLadder, job: _Job | None) -> None:
        self.id = w.id
        self.slo = w.slo()
        self.arrival_s = w.arrival_s
        self.prompt = w.prompt_tokens
        self.true_len = w.output_tokens
        self.app = w.app
        self.stage = w.stage or 0
        self.ladder = ladder
        self.max_tokens: int | None = None
        self.job = job
        self.phase = Phase.WAITING
        self.generated = 0
        self.computed = 0
        self.blocks = 0
        self.times: list[float] = []
        self.first_s: float | None = None
        self.demoted = False
        self.rejected = False
        self.finished = False
        self.released = False
        self.preemptions = 0
        self.deps_left = len(w.depends_on)
        self.dependents: list[_Req] = []
        self.state: RequestState | None = None
        self.used = 0
        self.pace_rate: float | None = None
        self.pace_owed = 0.0


@dataclass
class SimStats:
    """Engine-side counters of one run."""

    steps: int = 0
    busy_s: float = 0.0
    end_s: float = 0.0
    preemptions: int = 0
    preempt_recompute: int = 0
    preempt_swap: int = 0
    engine_preemptions: int = 0  # initiated by the engine on a KV shortage (the rest: by the policy)
    rejections: int = 0
    rejected_by_job_abort: int = 0
    rejected_by_engine: int = 0  # too long for the whole KV cache
    demotions: int = 0
    decisions: int = 0
    decision_s: list[float] = field(default_factory=list)
    snapshot_s: float = 0.0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    recomputed_tokens: int = 0
    swapped_blocks: int = 0
    max_live: int = 0
    truncated: bool = False  # stopped at the horizon with work left
    resident_steps: int = 0  # sum over steps of resident requests (mean = / steps)
    kv_used_steps: float = 0.0  # sum over steps of the KV fraction in use


@dataclass
class SimResult:
    outcomes: list[RequestOutcome]
    stats: SimStats
    rejected: list[str]  # ids rejected (never silently lost: their outcomes are in ``outcomes``)
    demoted: list[str]


class Simulator:
    """One engine, one policy, one workload. ``run()`` once."""

    def __init__(
        self,
        workload: Sequence[WorkloadRequest],
        ladders: Mapping[str, BoundLadder],
        policy: Policy,
        profile: Profile,
        *,
        rng: np.random.Generator | None = None,
        step_noise: float = 0.0,
        horizon_s: float | None = None,
        check_decisions: bool = False,
        charge_decisions: bool = False,
    ) -> None:
        """``check_decisions``: validate every decision and the engine's invariants each step (tests).
        ``charge_decisions``: a decision's measured time (and the snapshot's) is added to the step it precedes,
        as in a real engine whose scheduler runs inline with the step; off, decisions are free in simulated
        time (deterministic runs)."""
        self.policy = policy
        self.profile = profile
        self.cfg = profile.engine
        self.rng = rng if rng is not None else np.random.default_rng(0)
        self.step_noise = step_noise
        self.check = check_decisions
        self.charge_decisions = charge_decisions
        self._charge_s = 0.0  # decision time not yet charged to a step
        self.timing = engine_timing(profile)
        self.block = profile.engine.block_size
        self.free_blocks = profile.engine.kv_blocks
        self.swap_free = profile.engine.swap_blocks
        self.watermark = int(profile.engine.kv_blocks * WATERMARK_FRACTION)

        self.jobs: dict[str, _Job] = {}
        self.requests: list[_Req] = []
        by_id: dict[str, _Req] = {}
        for w in workload:
            job = None
            if w.job_id is not None:
                job = self.jobs.get(w.job_id)
                if job is None:
                    job = self.jobs[w.job_id] = _Job(w.job_id, w.arrival_s)
            req = _Req(w, ladders[w.id], job)
            if job is not None:
                job.calls.append(req)
            self.requests.append(req)
            by_id[w.id] = req
        for w in workload:
            for dep in w.depends_on:
                by_id[dep].dependents.append(by_id[w.id])
        roots = sorted((r for r in self.requests if r.deps_left == 0), key=lambda r: (r.arrival_s, r.id))
        self._arrivals = roots
        last = max((r.arrival_s for r in self.requests), default=0.0)
        self.horizon_s = horizon_s if horizon_s is not None else last + 3600.0

        self.live: dict[str, _Req] = {}
        self.resident: dict[str, _Req] = {}
        self.swapped: dict[str, _Req] = {}
        self.waiting: dict[str, _Req] = {}
        self._waiting_sorted = True
        self.run_order: list[_Req] = []
        self.token_budget = profile.engine.token_budget
        self.preempt_mode = PreemptMode.RECOMPUTE
        self.decided_at = 0.0
        self.steps_since_decision = 0
        self.dirty = True
        self.now = 0.0
        self.busy = False
        self._heap: list[tuple[float, int, int]] = []  # (time, kind rank, sequence)
        self._seq = 0
        self._next_arrival = 0
        self._recent: deque[float] = deque(maxlen=RECENT_STEPS)
        self._pending_swap = 0  # blocks moved over PCIe in the step being scheduled
        self._inflight: tuple[list[_Req], list[tuple[_Req, int]]] = ([], [])
        self.stats = SimStats()
        self.rejected: list[str] = []
        self.demoted: list[str] = []

    # ------------------------------------------------------------------ events
    def _push(self, t: float, kind: int) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, kind, self._seq))

    def _push_next_arrival(self) -> None:
        if self._next_arrival < len(self._arrivals):
            self._push(self._arrivals[self._next_arrival].arrival_s, ARRIVAL)

    def run(self, progress: Callable[[float], None] | None = None) -> SimResult:
        self._push_next_arrival()
        last_arrival = self._arrivals[-1].arrival_s if self._arrivals else 0.0
        report_every = max(1.0, last_arrival / 200)
        next_report = report_every
        while self._heap:
            t, kind, _ = heapq.heappop(self._heap)
            if t > self.horizon_s:
                self.stats.truncated = True
                break
            self.now = t
            if kind == ARRIVAL:
                while self._next_arrival < len(self._arrivals) and self._arrivals[self._next_arrival].arrival_s <= t:
                    self._release(self._arrivals[self._next_arrival], self._arrivals[self._next_arrival].arrival_s)
                    self._next_arrival += 1
                self._push_next_arrival()
            else:
                self._finish_step()
            if not self.busy:
                self._start_step()
            if progress is not None and t >= next_report:
                progress(min(1.0, t / last_arrival) if last_arrival > 0 else 1.0)
                next_report = t + report_every
        if progress is not None:
            progress(1.0)
        self.stats.end_s = self.now
        return SimResult(self._outcomes(), self.stats, self.rejected, self.demoted)

    # --------------------------------------------------------------- requests
    def _release(self, r: _Req, t: float) -> None:
        r.released = True
        r.arrival_s = t
        if r.job is not None:
            if r.job.failed:  # the job was aborted: its later calls never run
                r.rejected = True
                self.rejected.append(r.id)
                self.stats.rejections += 1
                self.stats.rejected_by_job_abort += 1
                return
            r.job.stage_calls[r.stage] += 1
            r.job.stage_prompts[r.stage].append(r.prompt)
            for sibling in r.job.calls:
                if sibling.released and sibling.stage == r.stage:
                    sibling.state = None
        self.live[r.id] = r
        self.waiting[r.id] = r  # released at ``t``, the latest arrival so far: the waiting order holds
        self._too_long(r, r.prompt + 1)
        self.dirty = True
        self.stats.max_live = max(self.stats.max_live, len(self.live))

    def _state(self, r: _Req) -> RequestState:
        state = r.state
        if state is None:
            job = r.job
            per_token = None
            if r.generated >= 2 and r.first_s is not None:
                per_token = (r.times[-1] - r.first_s) / (r.generated - 1)
            info = None
            if job is not None:
                info = job.info(r.stage)
            # RequestState(...) field by field, without the NamedTuple constructor's Python-level call
            state = r.state = tuple.__new__(RequestState, (
                r.id, r.slo, r.arrival_s, r.prompt, r.ladder, r.phase, r.generated, r.computed, r.blocks,
                r.app, r.first_s, per_token, 0, r.max_tokens, info, r.demoted, r.preemptions,
            ))
        return state

    def _snapshot(self) -> Snapshot:
        if not self._waiting_sorted:
            self.waiting = dict(sorted(self.waiting.items(), key=lambda kv: (kv[1].arrival_s, kv[0])))
            self._waiting_sorted = True
        state = self._state
        requests = (
            [state(r) for r in self.resident.values()]
            + [state(r) for r in self.swapped.values()]
            + [state(r) for r in self.waiting.values()]
        )
        limits = EngineLimits(
            token_budget=self.cfg.token_budget,
            max_running=self.cfg.max_running,
            kv_blocks_total=self.cfg.kv_blocks,
            kv_blocks_free=self.free_blocks,
            block_size=self.block,
            swap_blocks_free=self.swap_free,
        )
        recent = sum(self._recent) / len(self._recent) if self._recent else None
        timing = self.timing
        if recent is not None:
            from dataclasses import replace

            timing = replace(timing, recent_step_s=recent)
        return Snapshot(self.now, tuple(requests), limits, timing, self.stats.steps)

    # --------------------------------------------------------------- decisions
    def _decide(self) -> None:
        t0 = time.perf_counter()
        snapshot = self._snapshot()
        t1 = time.perf_counter()
        decision = self.policy.decide(snapshot)
        t2 = time.perf_counter()
        self.stats.snapshot_s += t1 - t0
        self.stats.decision_s.append(t2 - t1)
        if self.charge_decisions:
            self._charge_s += t2 - t0
        self.stats.decisions += 1
        if self.check:
            verdict = check_decision(snapshot, decision)
            if not verdict.ok:
                raise PolicyError(f"{self.policy.name}: bad decision at t={self.now:.3f}: {verdict.errors}")
        self._apply(decision)
        self.dirty = False
        self.steps_since_decision = 0

    def _apply(self, decision: Decision) -> None:
        live = self.live
        for rid in decision.reject:
            r = live.get(rid)
            if r is not None:
                self._reject(r)
        for rid in decision.demote:
            r = live.get(rid)
            if r is not None and not r.demoted:
                r.demoted = True
                r.state = None
                self.demoted.append(rid)
                self.stats.demotions += 1
        for p in decision.preempt:
            r = live.get(p.request_id)
            if r is not None and r.phase is Phase.RUNNING:
                self._preempt(r, p.mode)
        self.run_order = [r for r in (live.get(rid) for rid in decision.run) if r is not None]
        for r in self.run_order:
            r.used = 0
            r.pace_rate = None
        for pace in decision.pace:
            r = live.get(pace.request_id)
            if r is not None:
                r.pace_rate = pace.tokens_per_s
                r.pace_owed = pace.owed_tokens
        budget = self.cfg.token_budget
        self.token_budget = budget if decision.token_budget is None else max(1, min(budget, decision.token_budget))
        self.preempt_mode = decision.preempt_mode
        self.decided_at = self.now

    def _reject(self, r: _Req, by_job: bool = False) -> None:
        self._drop_kv(r)
        r.phase = Phase.WAITING
        r.rejected = True
        self.live.pop(r.id, None)
        self.waiting.pop(r.id, None)
        self.rejected.append(r.id)
        self.stats.rejections += 1
        if by_job:
            self.stats.rejected_by_job_abort += 1
        self.dirty = True
        job = r.job
        if job is not None and not job.failed:
            job.failed = True  # the job cannot meet its deadline without this call: abort it
            for call in job.calls:
                if call.id in self.live:
                    self._reject(call, by_job=True)

    def _drop_kv(self, r: _Req) -> None:
        if r.phase is Phase.RUNNING:
            self.free_blocks += r.blocks
            self.resident.pop(r.id, None)
        elif r.phase is Phase.SWAPPED:
            self.swap_free += r.blocks
            self.swapped.pop(r.id, None)
        r.blocks = 0

    def _preempt(self, r: _Req, mode: PreemptMode, by_engine: bool = False) -> None:
        """Evict a resident request; a swap's blocks are charged to the next step's PCIe time."""
        self.stats.preemptions += 1
        self.stats.engine_preemptions += int(by_engine)
        r.preemptions += 1
        r.state = None
        self.dirty = True
        if mode is PreemptMode.SWAP and self.swap_free >= r.blocks:
            self.stats.preempt_swap += 1
            self.resident.pop(r.id, None)
            self.free_blocks += r.blocks
            self.swap_free -= r.blocks
            r.phase = Phase.SWAPPED
            self.swapped[r.id] = r
            self.stats.swapped_blocks += r.blocks
            self._pending_swap += r.blocks
            return
        self.stats.preempt_recompute += 1
        self._drop_kv(r)
        self.stats.recomputed_tokens += r.computed
        r.computed = 0
        r.phase = Phase.WAITING
        self.waiting[r.id] = r
        self._waiting_sorted = False
        self._too_long(r, r.prompt + r.generated + 1)

    # ------------------------------------------------------------------ steps
    def _start_step(self) -> None:
        if not self.live:
            return
        frame = self.policy.frame_steps
        if self.dirty or (frame is not None and self.steps_since_decision >= frame):
            self._decide()
        decodes, prefills, swap_blocks = self._schedule()
        if not decodes and not prefills and not swap_blocks:
            if self.live and not self._heap:
                # nothing runnable and nothing will arrive: ask again, then give up loudly
                self._decide()
                decodes, prefills, swap_blocks = self._schedule()
                if not decodes and not prefills and not swap_blocks:
                    raise PolicyError(
                        f"{self.policy.name}: {len(self.live)} requests wait on an idle engine and the policy "
                        f"schedules none of them (t={self.now:.3f})"
                    )
            else:
                self.dirty = True  # idle until the next event; re-plan then
                return
        if self.check:
            self._check_step(decodes, prefills)
        prefill_tokens = 0
        pairs = 0.0
        ctx = 0
        sampled = len(decodes)
        for r, chunk in prefills:
            p = r.computed
            prefill_tokens += chunk
            pairs += chunk * (p + (chunk + 1) / 2)
            ctx += p + chunk
            if p + chunk == r.prompt + r.generated:
                sampled += 1
        kv = sum(r.computed + 1 for r in decodes)
        dt = self.profile.step_time(prefill_tokens, len(decodes), kv, pairs, ctx, sampled, swap_blocks)
        self._pending_swap = 0  # charged to this step
        if self.step_noise > 0:
            dt *= max(0.5, 1.0 + self.step_noise * float(self.rng.standard_normal()))
        dt += self._charge_s
        self._charge_s = 0.0
        self.stats.prefill_tokens += prefill_tokens
        self.stats.decode_tokens += len(decodes)
        self.stats.resident_steps += len(self.resident)
        self.stats.kv_used_steps += 1.0 - self.free_blocks / self.cfg.kv_blocks
        self._inflight = (decodes, prefills)
        self.busy = True
        self._push(self.now + dt, STEP_END)
        self.stats.busy_s += dt
        self._recent.append(dt)

    def _check_step(self, decodes: list[_Req], prefills: list[tuple[_Req, int]]) -> None:
        """Engine invariants (debug mode): limits per step, KV accounting, no request scheduled twice."""
        ids = [r.id for r in decodes] + [r.id for r, _ in prefills]
        problems = []
        if len(ids) != len(set(ids)):
            problems.append("a request is scheduled twice in one step")
        if len(ids) > self.cfg.max_running:
            problems.append(f"{len(ids)} requests scheduled, max_running {self.cfg.max_running}")
        tokens = len(decodes) + sum(c for _, c in prefills)
        if tokens > self.token_budget:
            problems.append(f"{tokens} tokens scheduled, budget {self.token_budget}")
        held = sum(r.blocks for r in self.resident.values())
        if held + self.free_blocks != self.cfg.kv_blocks or self.free_blocks < 0:
            problems.append(f"KV accounting: {held} held + {self.free_blocks} free != {self.cfg.kv_blocks}")
        swapped = sum(r.blocks for r in self.swapped.values())
        if swapped + self.swap_free != self.cfg.swap_blocks or self.swap_free < 0:
            problems.append(f"swap accounting: {swapped} + {self.swap_free} != {self.cfg.swap_blocks}")
        for r in decodes:
            if r.computed + 1 > r.blocks * self.block:
                problems.append(f"{r.id} decodes without a KV slot for its token")
        for r, chunk in prefills:
            if chunk <= 0 or r.computed + chunk > r.blocks * self.block:
                problems.append(f"{r.id} prefills {chunk} tokens without KV for them")
            if r.computed + chunk > r.prompt + r.generated:
                problems.append(f"{r.id} prefills past its known tokens")
        if problems:
            raise AssertionError(f"engine invariant broken at t={self.now:.4f}: {problems}")

    def _too_long(self, r: _Req, tokens: int) -> bool:
        """A request whose KV (``computed`` + ``tokens``) outgrows the whole cache can never finish: the engine
        aborts it (as vLLM refuses requests longer than the cache can hold) and reports it as rejected."""
        if -(-(r.computed + tokens) // self.block) <= self.cfg.kv_blocks - self.watermark:
            return False
        self.stats.rejected_by_engine += 1
        self._reject(r)
        return True

    def _grow(self, r: _Req, tokens: int, scheduled: set[str]) -> bool:
        """Make room for ``tokens`` more KV tokens of resident ``r``; preempts victims when needed."""
        if self._too_long(r, tokens):
            return False
        need = -(-(r.computed + tokens) // self.block) - r.blocks
        while need > self.free_blocks:
            victims = victim_order([x.id for x in self.run_order], list(self.resident))
            victim = next((self.resident[v] for v in victims if v not in scheduled), None)
            if victim is None:
                return False
            self._preempt(victim, self.preempt_mode, by_engine=True)
            if victim is r:
                return False
        if need > 0:
            self.free_blocks -= need
            r.blocks += need
        return True

    def _schedule(self) -> tuple[list[_Req], list[tuple[_Req, int]], int]:
        decodes, prefills = plan_step(self.run_order, self.cfg.max_running, self.token_budget,
                                      self.now - self.decided_at, self._reserve_decode, self._reserve_chunk)
        running = Phase.RUNNING
        decodes = [r for r in decodes if r.phase is running and not r.rejected]
        prefills = [(r, c) for r, c in prefills if r.phase is running and not r.rejected]
        return decodes, prefills, self._pending_swap

    def _reserve_decode(self, r: _Req, scheduled: set[str]) -> bool:
        """The step rule's KV callback for a decode: still resident (not evicted earlier in this pass) and
        a slot for its token, evicting others when needed."""
        return r.id in self.resident and self._grow(r, 1, scheduled)

    def _reserve_chunk(self, r: _Req, tokens: int) -> int:
        """The step rule's KV callback for a prefill chunk: swapped requests are swapped back in (no tokens
        this step); a waiting one is admitted when the chunk fits above the watermark."""
        if r.rejected:
            return 0
        phase = r.phase
        if phase is Phase.SWAPPED:
            if self.free_blocks - r.blocks >= self.watermark:
                self.free_blocks -= r.blocks
                self.swap_free += r.blocks
                self._pending_swap += r.blocks
                del self.swapped[r.id]
                r.phase = Phase.RUNNING
                self.resident[r.id] = r
                r.state = None
            return 0
        chunk = tokens
        need = -(-(r.computed + chunk) // self.block) - r.blocks
        reserve = self.watermark if phase is Phase.WAITING else 0
        if need > self.free_blocks - reserve:
            chunk = min(chunk, (r.blocks + self.free_blocks - reserve) * self.block - r.computed)
            if chunk <= 0:
                return 0
            need = -(-(r.computed + chunk) // self.block) - r.blocks
        if phase is Phase.WAITING:
            del self.waiting[r.id]
            r.phase = Phase.RUNNING
            self.resident[r.id] = r
        if need > 0:
            self.free_blocks -= need
            r.blocks += need
        r.state = None
        return chunk

    def _finish_step(self) -> None:
        t = self.now
        self.busy = False
        self.stats.steps += 1
        self.steps_since_decision += 1
        decodes, prefills = self._inflight
        self._inflight = ([], [])
        for r in decodes:
            if r.phase is not Phase.RUNNING:
                continue
            r.computed += 1
            self._emit(r, t)
        for r, chunk in prefills:
            if r.phase is not Phase.RUNNING:
                continue
            r.computed += chunk
            r.state = None
            if r.computed == r.prompt + r.generated:
                self._emit(r, t)

    def _emit(self, r: _Req, t: float) -> None:
        r.generated += 1
        r.used += 1
        r.times.append(t)
        r.state = None
        if r.first_s is None:
            r.first_s = t
        if r.generated >= r.true_len:
            self._finish(r, t)

    def _finish(self, r: _Req, t: float) -> None:
        r.finished = True
        self._drop_kv(r)
        self.live.pop(r.id, None)
        self.dirty = True
        job = r.job
        if job is not None:
            job.done_tokens += r.prompt + r.generated
            job.finished[r.stage].append((r.prompt, r.generated))
            for call in job.calls:
                if call.id in self.live:
                    call.state = None
        for dependent in r.dependents:
            dependent.deps_left -= 1
            if dependent.deps_left == 0 and not dependent.released:
                self._release(dependent, t)

    # ---------------------------------------------------------------- results
    def _outcomes(self) -> list[RequestOutcome]:
        outcomes = []
        for r in self.requests:
            job = r.job
            outcomes.append(
                RequestOutcome(
                    request_id=r.id,
                    slo=r.slo,
                    arrival_s=r.arrival_s if r.released else (job.arrival_s if job is not None else r.arrival_s),
                    prompt_tokens=r.prompt,
                    token_times_s=tuple(r.times),
                    finished=r.finished,
                    job_id=job.job_id if job is not None else None,
                    job_arrival_s=job.arrival_s if job is not None else None,
                )
            )
        return outcomes


def oracle_ladders(workload: Sequence[WorkloadRequest]) -> dict[str, BoundLadder]:
    """Exact single-step ladders (for tests and the 'oracle' provider)."""
    return {w.id: BoundLadder.fixed(w.output_tokens, quantile=1.0) for w in workload}


__all__ = [
    "PolicyError",
    "SimResult",
    "SimStats",
    "Simulator",
    "engine_timing",
    "oracle_ladders",
]
