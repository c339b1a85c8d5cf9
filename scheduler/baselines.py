"""Baselines: faithful, small versions of what users run today and of the papers Tempo compares with.

Each is an ordering plus ``pack``; none rejects or demotes (admission control is Tempo's), and all see
bounds, never true lengths.

- ``fcfs``: vLLM's default (v1, chunked prefill as Sarathi-Serve): running requests keep their place,
  waiting ones are admitted in arrival order until a request does not fit (head-of-line blocking); on a
  KV shortage the most recently admitted running request is preempted by recompute.
- ``priority``: vLLM's ``priority`` policy: waiting requests admitted by (priority, arrival); running ones
  are not preempted to admit others, and the lowest-priority running request is the KV victim. Requests
  carry no user priority in our workloads, so the priority is what an operator would configure from the
  class: interactive chat first, then agentic jobs, then API jobs, best effort last; tighter tier first.
- ``edf``: earliest deadline first over every live request (the next token's due time for chat, the
  response deadline, the job deadline), preemptive: lower-ranked residents are paused, and evicted when a
  higher-ranked request needs their KV.
- ``sjf``: shortest predicted job first, LTR-style (Fu et al., 2024): waiting requests ranked by predicted
  length (the bound provider's B0), running ones not preempted; a request waiting longer than
  ``starvation_s`` jumps the ranking (LTR's starvation prevention).
- ``srtf``: shortest predicted remaining length first (the ladder at the current k), preemptive.
- ``autellix``: Autellix-style program-level least attained service (PLAS): a compound job is one program
  whose attained service is every token its calls were served; multi-level queues by attained service
  (thresholds in tokens), FCFS by program arrival within a level, preemptive, with anti-starvation.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from tempo.scheduler.interface import Decision, Phase, Policy, RequestState, Snapshot
from tempo.scheduler.planning import arrival_key, decision_from, pack, slo_deadline
from tempo.scheduler.registry import PolicyContext, register_policy
from tempo.scheduler.slo import SLOClass

CLASS_RANK = {SLOClass.LATENCY: 0, SLOClass.COMPOUND: 1, SLOClass.DEADLINE: 2, SLOClass.BEST_EFFORT: 3}


class FCFS(Policy):
    name = "fcfs"
    frame_steps = None  # the plan changes only when requests arrive, finish or are preempted

    def decide(self, snapshot: Snapshot) -> Decision:
        if not snapshot.requests:
            return Decision.empty()
        # The snapshot lists residents (admission order), then swapped, then waiting by arrival: FCFS.
        return decision_from(pack(snapshot.requests, snapshot.limits, stop_at_blocked=True))


def static_priority(request: RequestState) -> tuple[int, int, float]:
    """(user priority, class rank, SLO tightness): what an operator maps onto vLLM's ``priority``."""
    slo = request.slo
    tightness = slo.ttft_s or slo.deadline_s or slo.job_deadline_s or 0.0
    return (request.priority, CLASS_RANK[slo.slo_class], tightness)


class StaticPriority(Policy):
    name = "priority"
    frame_steps = None

    def decide(self, snapshot: Snapshot) -> Decision:
        if not snapshot.requests:
            return Decision.empty()

        def key(r: RequestState) -> tuple[Any, ...]:
            return (*static_priority(r), r.arrival_s, r.request_id)

        resident = sorted((r for r in snapshot.requests if r.phase is Phase.RUNNING), key=key)
        queued = sorted((r for r in snapshot.requests if r.phase is not Phase.RUNNING), key=key)
        return decision_from(pack([*resident, *queued], snapshot.limits, stop_at_blocked=True))


class EDF(Policy):
    name = "edf"

    def decide(self, snapshot: Snapshot) -> Decision:
        if not snapshot.requests:
            return Decision.empty()
        ordered = sorted(snapshot.requests, key=lambda r: (slo_deadline(r), *arrival_key(r)))
        return decision_from(pack(ordered, snapshot.limits, preempt=True))


class SJF(Policy):
    name = "sjf"
    frame_steps = None

    def __init__(self, starvation_s: float = 30.0) -> None:
        self.starvation_s = starvation_s

    def decide(self, snapshot: Snapshot) -> Decision:
        if not snapshot.requests:
            return Decision.empty()
        now = snapshot.now_s
        resident = [r for r in snapshot.requests if r.phase is Phase.RUNNING]

        def key(r: RequestState) -> tuple[Any, ...]:
            starved = now - r.arrival_s > self.starvation_s
            return (0 if starved else 1, r.arrival_s if starved else r.ladder.initial, r.arrival_s, r.request_id)

        queued = sorted((r for r in snapshot.requests if r.phase is not Phase.RUNNING), key=key)
        return decision_from(pack([*resident, *queued], snapshot.limits))

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "starvation_s": self.starvation_s}


class SRTF(Policy):
    name = "srtf"

    def decide(self, snapshot: Snapshot) -> Decision:
        if not snapshot.requests:
            return Decision.empty()
        ordered = sorted(
            snapshot.requests, key=lambda r: (r.remaining_bound() + r.pending_tokens - 1, *arrival_key(r))
        )
        return decision_from(pack(ordered, snapshot.limits, preempt=True))


class Autellix(Policy):
    """Program-level least attained service with discretised queues (Autellix, Luo et al., 2025)."""

    name = "autellix"

    def __init__(
        self, thresholds: tuple[int, ...] = (2_048, 8_192, 32_768, 131_072), starvation_s: float = 60.0
    ) -> None:
        self.thresholds = tuple(thresholds)
        self.starvation_s = starvation_s

    def decide(self, snapshot: Snapshot) -> Decision:
        if not snapshot.requests:
            return Decision.empty()
        now = snapshot.now_s
        attained: dict[str, int] = defaultdict(int)
        for r in snapshot.requests:
            program = r.job.job_id if r.job is not None else r.request_id
            served = r.generated + (r.prompt_tokens if (r.generated or r.computed_tokens) else 0)
            attained[program] += served
        done = {r.job.job_id: r.job.done_tokens for r in snapshot.requests if r.job is not None}
        for program, tokens in done.items():
            attained[program] += tokens

        def level(r: RequestState) -> int:
            start, _ = arrival_key(r)
            if r.phase is not Phase.RUNNING and now - start > self.starvation_s:
                return 0  # anti-starvation: a program waiting too long goes to the top queue
            service = attained[r.job.job_id if r.job is not None else r.request_id]
            return 1 + sum(1 for t in self.thresholds if service >= t)

        ordered = sorted(snapshot.requests, key=lambda r: (level(r), *arrival_key(r)))
        # Preemption pauses lower-level residents; their KV is evicted only when running requests must
        # grow (the engine's rule). Evicting KV to admit every new level-0 program made each arrival
        # recompute a long agentic context: a preemption storm that multiplied the work ~8x in our runs.
        return decision_from(pack(ordered, snapshot.limits))

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "thresholds": list(self.thresholds), "starvation_s": self.starvation_s}


@register_policy("fcfs", "vLLM default: FCFS with chunked prefill (Sarathi-Serve)")
def _fcfs(context: PolicyContext) -> Policy:
    return FCFS()


@register_policy("priority", "vLLM priority scheduling, class-based priorities")
def _priority(context: PolicyContext) -> Policy:
    return StaticPriority()


@register_policy("edf", "earliest deadline first, preemptive")
def _edf(context: PolicyContext) -> Policy:
    return EDF()


@register_policy("sjf", "shortest predicted job first (LTR-style), starvation prevention")
def _sjf(context: PolicyContext, starvation_s: float = 30.0) -> Policy:
    return SJF(starvation_s=float(starvation_s))


@register_policy("srtf", "shortest predicted remaining time first, preemptive")
def _srtf(context: PolicyContext) -> Policy:
    return SRTF()


@register_policy("autellix", "Autellix program-level least attained service")
def _autellix(context: PolicyContext, starvation_s: float = 60.0) -> Policy:
    return Autellix(starvation_s=float(starvation_s))
