"""Tempo: give each request just enough decode bandwidth to meet its SLO, and spend the rest on the
work that earns the most goodput per second (arXiv 2504.20068, Tempo / JITServe).

Every frame (``frame_steps`` engine steps; the engine also re-plans after arrivals and finishes):

1. **Assess** each live request from its bound ladder at its current k and the measured per-token time:
   the remaining-length bound, the minimum decode bandwidth that still meets its SLO (latency: the TBT
   pace, plus the tokens already owed; deadline: remaining bound over the time left; compound: the same
   against a *stage sub-deadline*: the job deadline minus what the rest of the job is likely to need, from
   per-app statistics of past jobs), and its priority = the goodput it can still earn / the time it still
   needs. Goodput that depends on the bound holding is weighted by how much of the bound's time is left
   (1 when the bound fits, falling linearly when only part of it does).
2. **Admission**: a deadline or compound request past its (job) deadline is rejected: it can earn nothing.
   One that cannot meet its SLO even at the engine's fastest pace, or whose weighted chance is below
   ``min_success``, is demoted to best effort (still served from spare capacity; its SLO still counts).
3. **GMAX grouping**: among requests whose priority is within a factor ``p`` of the B-th best (B: the
   engine's batch size), choose the B of similar remaining lengths with the largest total priority; they
   go first, then the other feasible requests by priority, then best effort (residents, then by arrival).
4. **Just enough**: every SLO request gets a pace (its minimum bandwidth); the engine decodes a request at
   full priority only while it is within its pace, then fills what is left with the next best and
   best-effort work. The prefill budget per step is cut (never below ``min_chunk``) so the step time stays
   within what the running chat requests' TBT allows, unless newcomers need more prefill to meet TTFT.
5. **Preemption** only when the gain exceeds the loss: a resident is evicted for a higher-priority request
   when ``(p_new - p_victim) x frame`` exceeds ``p_victim x stall + cost x (goodput rate of the batch)``,
   in whichever mode (recompute or swap) costs less.

The oracle variant sees the true lengths and job graphs (``OracleTruth``), and nothing else does.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from tempo.scheduler.interface import (
    Decision,
    Pace,
    Phase,
    Policy,
    Preemption,
    PreemptMode,
    RequestState,
    Snapshot,
)
from tempo.scheduler.jobs import JobProfile, OracleTruth, StageOutlook
from tempo.scheduler.planning import arrival_key, cheaper_mode, pack
from tempo.scheduler.registry import PolicyContext, register_policy
from tempo.scheduler.slo import SLOClass

GROUPINGS = ("gmax", "sjf", "priority")

_REJECT = "reject"


class _Costs(NamedTuple):
    """Per-decision constants of the engine's cost model (seconds)."""

    tau: float  # current time per decode step (measured)
    tau_floor: float  # fastest possible step (a lone short decode)
    s_pre: float  # wall time per prefill token, prefilling alone in full chunks
    c_pre: float  # engine time a prefill token adds to a step
    c_seq: float  # engine time a decode token adds to a step (linear layers + its share of the step overhead)
    c_kv: float  # engine time per cached token a decode reads

_DEMOTE = "demote"


class Assessment(NamedTuple):
    """One SLO request's standing in this frame (a NamedTuple: one is built per request per decision)."""

    request: RequestState
    priority: float  # goodput it can still earn per second of engine time it still needs (tokens/s)
    rem: int  # remaining-length bound (or the truth, for the oracle)
    rate: float  # minimum decode bandwidth that meets the SLO (tokens/s)
    owed: float  # tokens already due (behind schedule) + 1 margin
    tau_need: float  # longest step time that keeps it on schedule over the frame (chat only; inf otherwise)
    prefill_rate: float  # prefill tokens/s it needs to start in time (0 once decoding)


def gmax_select(ranked: list[Assessment], batch: int, p: float) -> list[Assessment]:
    """GMAX: among ``ranked`` (by priority, best first) whose priority is within a factor ``p`` of the
    ``batch``-th best, the ``batch`` consecutive ones in remaining-length order with the largest total
    priority, returned best first."""
    if len(ranked) <= batch:
        return list(ranked)
    threshold = ranked[batch - 1].priority / p
    end = batch
    while end < len(ranked) and ranked[end].priority >= threshold:
        end += 1
    pool = ranked[:end]
    if len(pool) <= batch:
        return pool
    by_length = sorted(pool, key=lambda a: (a.rem, a.request.request_id))
    window = sum(a.priority for a in by_length[:batch])
    best, best_start = window, 0
    for start in range(1, len(by_length) - batch + 1):
        window += by_length[start + batch - 1].priority - by_length[start - 1].priority
        if window > best * (1 + 1e-12):
            best, best_start = window, start
    chosen = by_length[best_start : best_start + batch]
    chosen.sort(key=lambda a: (-a.priority, a.request.request_id))
    return chosen


class TempoPolicy(Policy):
    name = "tempo"

    def __init__(
        self,
        *,
        frame_steps: int = 50,
        p: float = 1.5,
        grouping: str = "gmax",
        pace: bool = True,
        budget_control: bool = True,
        min_chunk: int = 64,
        min_success: float = 0.25,
        share: int = 4,
        compute_density: bool = True,
        be_only_when_idle: bool = True,
        job_profile: JobProfile | None = None,
        truth: OracleTruth | None = None,
    ) -> None:
        if grouping not in GROUPINGS:
            raise ValueError(f"grouping must be one of {GROUPINGS}, got {grouping!r}")
        if p < 1:
            raise ValueError("p must be >= 1")
        self.frame_steps = int(frame_steps)
        self.p = float(p)
        self.grouping = grouping
        self.pace = bool(pace)
        self.budget_control = bool(budget_control)
        self.min_chunk = int(min_chunk)
        self.min_success = float(min_success)
        self.share = int(share)
        self.compute_density = bool(compute_density)
        self.be_only_when_idle = bool(be_only_when_idle)
        self.job_profile = job_profile or JobProfile()
        self.truth = truth

    def kwargs(self) -> dict[str, Any]:
        """The constructor arguments that reproduce this policy (besides job profile and truth)."""
        return {
            "frame_steps": self.frame_steps,
            "p": self.p,
            "grouping": self.grouping,
            "pace": self.pace,
            "budget_control": self.budget_control,
            "min_chunk": self.min_chunk,
            "min_success": self.min_success,
            "share": self.share,
            "compute_density": self.compute_density,
            "be_only_when_idle": self.be_only_when_idle,
        }

    def describe(self) -> dict[str, object]:
        return {
            **super().describe(),
            **self.kwargs(),
            "oracle": self.truth is not None,
            "job_profile_apps": sorted(self.job_profile.by_app),
        }

    # ------------------------------------------------------------ knowledge
    def _remaining(self, r: RequestState) -> int:
        if self.truth is not None:
            true = self.truth.lengths.get(r.request_id)
            if true is not None:
                return max(1, true - r.generated)
        return r.ladder.remaining_at(r.generated, r.max_tokens)

    def _outlook(self, r: RequestState) -> StageOutlook:
        assert r.job is not None
        if self.truth is not None and r.job.job_id in self.truth.jobs:
            return self.truth.outlook(r.job.job_id, r.job.stage)
        return self.job_profile.outlook(r.app, r.job.stage)

    # ------------------------------------------------------------ assess
    def _assess(self, r: RequestState, now: float, k: _Costs) -> Assessment | str:
        g = r.generated
        rem = self._remaining(r)
        pending = r.prompt_tokens + g - r.computed_tokens
        prefill_left = pending - 1 if g > 0 else pending
        tau = k.tau
        t_pre = prefill_left * k.s_pre
        # engine time the request still consumes: its prefill, and each decode's share of a step
        cost = prefill_left * k.c_pre + rem * (k.c_seq + k.c_kv * (r.prompt_tokens + g + rem / 2))
        slo = r.slo
        cls = slo.slo_class
        if cls is SLOClass.LATENCY:
            ttft, tbt = slo.ttft_s, slo.tbt_s
            assert ttft is not None and tbt is not None
            first_due = r.arrival_s + ttft
            spare = first_due + g * tbt - now - t_pre  # before the next token is late
            late = tau - spare
            if late <= 0:
                on_time = rem
            elif tbt > tau:
                on_time = max(0, rem - math.ceil(late / (tbt - tau)))
            else:
                on_time = 0
            if on_time <= 0:
                return _DEMOTE
            value = on_time + (r.prompt_tokens if g == 0 and late <= 0 else 0)
            if not self.compute_density:
                cost = t_pre + rem * tau
            owed = max(0.0, math.floor((now - first_due) / tbt) + 1 - g) + 1.0
            n = self.frame_steps
            tau_need = min(spare, (spare + (n - 1) * tbt) / n) if spare > 0 else tbt
            prefill_rate = prefill_left / max(tau, first_due - now) if g == 0 else 0.0
            return Assessment(r, value / max(cost, 1e-9), rem, 1.0 / tbt, owed, max(tau_need, 1e-6), prefill_rate)

        if cls is SLOClass.DEADLINE:
            assert slo.deadline_s is not None
            left = r.arrival_s + slo.deadline_s - now
            after = after_floor = 0.0
            value = float(r.prompt_tokens + g + rem)
        else:  # compound: the stage sub-deadline leaves room for the rest of the job
            assert slo.job_deadline_s is not None and r.job is not None
            left = r.job.job_arrival_s + slo.job_deadline_s - now
            outlook = self._outlook(r)
            after = outlook.time_s(tau, k.s_pre)
            after_floor = outlook.time_s(k.tau_floor, k.s_pre)
            value = r.job.done_tokens + r.job.stage_calls * float(r.prompt_tokens + g + rem) + outlook.tokens_after
            calls = r.job.stage_calls
            cost = calls * cost + outlook.prefill_total_after * k.c_pre + outlook.decode_total_after * (
                k.c_seq + k.c_kv * (r.prompt_tokens + g)
            )
        if left <= 0:
            return _REJECT
        if self.truth is not None and t_pre + rem * k.tau_floor + after_floor > left:
            return _DEMOTE  # the oracle knows it cannot make it
        needed = t_pre + rem * tau + after
        success = min(1.0, left / needed) if needed > 0 else 1.0
        if success < self.min_success:
            return _DEMOTE
        if not self.compute_density:
            cost = needed
        stage_left = left - after - t_pre
        rate = rem / stage_left if stage_left > tau else 1.0 / tau
        prefill_rate = prefill_left / max(tau, stage_left - rem * tau) if prefill_left > 0 else 0.0
        return Assessment(r, value * success / max(cost, 1e-9), rem, rate, 1.0, math.inf, prefill_rate)

    # ------------------------------------------------------------ decide
    def decide(self, snapshot: Snapshot) -> Decision:
        if not snapshot.requests:
            return Decision.empty()
        now, limits, timing = snapshot.now_s, snapshot.limits, snapshot.timing
        tau_floor = timing.base_s
        tau = max(timing.recent_step_s or 0.0, tau_floor)
        s_pre = timing.recompute_s_per_token
        frame_s = self.frame_steps * tau
        costs = _Costs(
            tau=tau,
            tau_floor=tau_floor,
            s_pre=s_pre,
            c_pre=timing.per_seq_s + timing.per_prefill_token_s,
            c_seq=timing.per_seq_s + timing.base_s / max(1, limits.max_running),
            c_kv=timing.per_kv_token_s,
        )

        feasible: list[Assessment] = []
        best_effort: list[RequestState] = []
        reject: list[str] = []
        demote: list[str] = []
        for r in snapshot.requests:
            if r.demoted or r.slo.slo_class is SLOClass.BEST_EFFORT:
                best_effort.append(r)
                continue
            verdict = self._assess(r, now, costs)
            if verdict == _REJECT:
                reject.append(r.request_id)
            elif verdict == _DEMOTE:
                demote.append(r.request_id)
                best_effort.append(r)
            else:
                assert isinstance(verdict, Assessment)
                feasible.append(verdict)

        batch = limits.max_running
        if self.grouping == "sjf":
            ranked = sorted(feasible, key=lambda a: (a.rem, a.request.request_id))
            first: list[Assessment] = ranked
        else:
            ranked = sorted(feasible, key=lambda a: (-a.priority, a.request.request_id))
            first = gmax_select(ranked, batch, self.p) if self.grouping == "gmax" else ranked
        chosen_ids = {a.request.request_id for a in first}
        rest = [a for a in ranked if a.request.request_id not in chosen_ids]
        order_assessed = [*first, *rest]
        best_effort.sort(key=lambda r: (r.phase is not Phase.RUNNING, *arrival_key(r)))
        ordered = [a.request for a in order_assessed] + best_effort

        priority = {a.request.request_id: a.priority for a in order_assessed}
        batch_rate = sum(a.priority for a in order_assessed[:batch])
        mode_default = PreemptMode.SWAP if limits.swap_blocks_free > 0 and timing.swap_s_per_block else (
            PreemptMode.RECOMPUTE
        )

        def worth_evicting(victim: RequestState, newcomer: RequestState) -> bool:
            _, cost = cheaper_mode(victim, limits, timing.swap_s_per_block, s_pre)
            p_victim = priority.get(victim.request_id, 0.0)
            gain = (priority.get(newcomer.request_id, 0.0) - p_victim) * frame_s
            loss = p_victim * (cost + tau) + cost * batch_rate
            return gain > loss

        # Paced requests share the engine's slots: admit up to ``share`` times as many as fit in one step.
        admit = limits.max_running * (self.share if self.pace else 1)
        slo_ordered = [a.request for a in order_assessed]
        packing = pack(slo_ordered, limits, preempt=True, can_evict=worth_evicting, max_requests=admit,
                       others=best_effort)
        if best_effort and (not self.be_only_when_idle or len(packing.run) == len(slo_ordered)):
            # every feasible SLO request is in: fill the rest with best-effort work
            packing = pack(ordered, limits, preempt=True, can_evict=worth_evicting, max_requests=admit)
        evictions = []
        for victim in packing.evict:
            mode, _ = cheaper_mode(victim, limits, timing.swap_s_per_block, s_pre)
            evictions.append((victim, mode))

        run_ids = {r.request_id for r in packing.run}
        admitted = [a for a in order_assessed if a.request.request_id in run_ids]
        paces = (
            tuple(Pace(a.request.request_id, a.rate, a.owed) for a in admitted) if self.pace else ()
        )
        budget = self._budget(admitted, packing.run, limits.token_budget, timing, tau) if self.budget_control else None
        return Decision(
            run=tuple(r.request_id for r in packing.run),
            pace=paces,
            preempt=tuple(Preemption(v.request_id, m) for v, m in evictions),
            reject=tuple(reject),
            demote=tuple(demote),
            token_budget=budget,
            preempt_mode=mode_default,
        )

    def _budget(
        self,
        admitted: list[Assessment],
        run: tuple[RequestState, ...],
        limit: int,
        timing: Any,
        tau: float,
    ) -> int | None:
        """Prefill tokens per step: as many as the tightest running chat request's pace allows, and at least
        what the admitted newcomers need to start in time."""
        tau_target = math.inf
        prefill_rate = 0.0
        for a in admitted:
            if a.request.decoding:
                tau_target = min(tau_target, a.tau_need)
            prefill_rate += a.prefill_rate
        if math.isinf(tau_target):
            return None
        decodes = sum(1 for r in run if r.decoding)
        kv = sum(r.computed_tokens for r in run if r.decoding)
        per_prefill = timing.per_seq_s + timing.per_prefill_token_s
        decode_step = timing.step_time(decodes, kv)
        by_pace = (tau_target - decode_step) / per_prefill if per_prefill > 0 else limit
        by_start = prefill_rate * max(tau_target, decode_step)
        budget = max(by_pace, by_start, self.min_chunk + decodes)
        return None if budget >= limit else max(1, int(budget))


def _tempo_factory(**fixed: Any) -> Any:
    def factory(context: PolicyContext, **params: Any) -> Policy:
        kwargs = {**fixed, **params}
        for key in ("frame_steps", "min_chunk", "share"):
            if key in kwargs:
                kwargs[key] = int(kwargs[key])
        for key in ("p", "min_success"):
            if key in kwargs:
                kwargs[key] = float(kwargs[key])
        for key in ("pace", "budget_control", "compute_density", "be_only_when_idle"):
            if key in kwargs and isinstance(kwargs[key], str):
                kwargs[key] = kwargs[key].lower() in ("1", "true", "yes", "on")
        truth = kwargs.pop("truth", None)
        return TempoPolicy(job_profile=context.job_profile, truth=truth, **kwargs)

    return factory


class OracleTempo(TempoPolicy):
    """Tempo with perfect information: true remaining lengths and true job graphs."""

    name = "oracle"


def _oracle(context: PolicyContext, **params: Any) -> Policy:
    if context.truth is None:
        raise ValueError("the oracle policy needs the true lengths and job graphs (PolicyContext.truth)")
    tempo = _tempo_factory()(context, **params)
    assert isinstance(tempo, TempoPolicy)
    return OracleTempo(**{**tempo.kwargs(), "truth": context.truth, "job_profile": context.job_profile})


register_policy("tempo", "Tempo: just-enough bandwidth, goodput priority, GMAX grouping")(_tempo_factory())
register_policy("tempo-sjf", "ablation: Tempo with SJF on the bound instead of GMAX")(_tempo_factory(grouping="sjf"))
register_policy("tempo-nopace", "ablation: Tempo without per-request pacing and prefill budget control")(
    _tempo_factory(pace=False, budget_control=False)
)
register_policy("oracle", "Tempo with the true lengths and job graphs (upper reference)")(_oracle)
