"""Tempo: give each request just enough decode bandwidth to meet its SLO, and spend the rest on the
work that earns the most goodput (arXiv 2504.20068, Tempo / JITServe).

Every frame (``frame_steps`` engine steps; the engine also re-plans after arrivals and finishes):

1. **Assess** each live request from its bound ladder at its current k and the engine's measured step
   time: the remaining-length bound; the minimum decode bandwidth that still meets its SLO (latency: the
   TBT pace plus the tokens already owed; deadline: remaining bound over the time left; compound: the same
   against a *stage sub-deadline*: the job deadline minus what the rest of the job is likely to need, from
   per-app statistics of past jobs); and its priority = the goodput it can still earn / the time it still
   needs. "Time" is the engine time the request still costs (its prefill, and each decode's share of a
   step: linear layers, step overhead, KV read), so that prompt-heavy and decode-heavy work compete fairly
   on a compute-bound engine (``compute_density=False`` uses the request's own generation time instead,
   as the paper states it). All-or-nothing goodput (deadline, compound) is weighted by the share of the
   bound's time that is left (1 when the bound fits).
2. **Admission**: a deadline or compound request past its (job) deadline is rejected: it can earn
   nothing. One whose weighted chance is below ``min_success`` (or, for chat, that can no longer put a
   single token on time within its bound) is demoted to best effort: it runs only when every feasible SLO
   request is admitted, and its SLO still counts.
3. **GMAX grouping**: among requests whose priority is within a factor ``p`` of the B-th best (B: the
   engine's batch size), choose the B of similar remaining lengths with the largest total priority; they
   go first, then the other feasible requests by priority, then best effort (residents, then by arrival).
4. **Just enough**: every admitted SLO request gets a pace (its minimum bandwidth); the engine decodes it
   at full priority only while it is within its pace, and fills the slots left with the next best and
   best-effort work, so up to ``share`` x B requests progress on B slots. The prefill budget per step is
   cut (never below ``min_chunk``) so the step time stays within what the running chat requests' TBT
   allows, unless newcomers need more prefill to meet their TTFT.
5. **Preemption** only when the gain exceeds the loss: a resident is evicted for a higher-priority request
   when ``(p_new - p_victim) x frame`` exceeds ``p_victim x (stall + step) + cost x (goodput rate of the
   batch)``, in whichever mode (recompute or swap) costs less.

The oracle variant sees the true lengths and job graphs (``OracleTruth``), and nothing else does.

Speed: per request the parts of the assessment that do not depend on the clock are memoised, keyed by
the identity of the (immutable) request state, which the engine reuses while a request is unchanged; a
decision then costs a few float operations per request plus sorting.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence
from typing import Any, Final, NamedTuple

from tempo.scheduler.interface import (
    Decision,
    EngineTiming,
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
POOL_LIMIT = 8  # GMAX looks at most this many batches deep into the ranking (bounds its cost)


def _laxity(st: _Static | None, now: float, tau: float) -> float:
    """Seconds a request can still wait before it must run continuously to meet its SLO (best effort: inf)."""
    if st is None or st[_KIND] == _BE:
        return math.inf
    if st[_KIND] == _LATENCY:
        return st[_DUE] - now - tau
    return st[_DUE] - now - (st[_NEED_A] + tau * st[_NEED_B])


def _new_pace(fields: tuple[str, float, float]) -> Pace:
    """``Pace(*fields)`` without the NamedTuple constructor's Python-level call (hundreds per decision)."""
    return tuple.__new__(Pace, fields)
_BE, _LATENCY, _DEADLINE, _COMPOUND = 0, 1, 2, 3
# enum members bound once: ``SLOClass.LATENCY`` costs a metaclass lookup (~0.2 us) on every use
_CLASS_BE, _CLASS_LATENCY, _CLASS_DEADLINE = SLOClass.BEST_EFFORT, SLOClass.LATENCY, SLOClass.DEADLINE


class _Engine(NamedTuple):
    """The engine constants the memoised parts depend on (seconds)."""

    tau_floor: float  # fastest possible step (a lone short decode)
    s_pre: float  # wall time per prefill token, prefilling alone in full chunks
    c_pre: float  # engine time a prefill token adds to a step
    c_seq: float  # engine time a decode token adds (linear layers + its share of the step overhead)
    c_kv: float  # engine time per cached token a decode reads


# The clock-independent part of a request's assessment, memoised per request state. A plain tuple (cheaper
# to build than a NamedTuple; the engine makes new states for every resident at every step), by position:
_KIND: Final = 0  # _BE, _LATENCY, _DEADLINE or _COMPOUND
_REM: Final = 1  # remaining-length bound
_PREFILL: Final = 2  # tokens to (re)compute before its next token
_COST: Final = 3  # engine time it still needs (for a compound call: with the rest of its job)
_VALUE: Final = 4  # deadline/compound: tokens it earns if met; latency: the prompt (earned with the TTFT)
_DUE: Final = 5  # latency: when the next token is due, less its prefill time; else the (job) deadline
_TBT: Final = 6  # latency: seconds per token
_NEED_A: Final = 7  # time it needs = need_a + tau * need_b (latency: need_b = rem)
_NEED_B = 8
_AFTER_A: Final = 9  # compound: rest of the job = after_a + tau * after_b
_AFTER_B = 10
_FIRST_DUE: Final = 11  # latency: arrival + TTFT
_Static = tuple[int, int, int, float, float, float, float, float, float, float, float, float]
_BE_STATIC: _Static = (_BE, 0, 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
# Per request id: (ladder, job info, demoted, max_tokens, kind, true length | None, class constants,
# bound, k_lo, k_hi): the ladder step [k_lo, k_hi) the request was last seen on and its bound.
_Constants = tuple[Any, ...]


class Assessment(NamedTuple):
    """One SLO request's standing in this frame."""

    request: RequestState
    priority: float  # goodput it can still earn per second it still needs (tokens/s)
    rem: int  # remaining-length bound (or the truth, for the oracle)
    rate: float  # minimum decode bandwidth that meets the SLO (tokens/s)
    owed: float  # tokens already due (behind schedule) + 1 margin
    tau_need: float  # longest step time that keeps it on schedule over the frame (chat only; inf otherwise)
    prefill_rate: float  # prefill tokens/s it needs to start in time (0 once decoding)


def gmax_order(order: Sequence[int], priority: Sequence[float], length: Sequence[int], batch: int,
               p: float) -> list[int]:
    """GMAX over candidates ``order`` (indices, best priority first): among those whose priority is within
    a factor ``p`` of the ``batch``-th best (at most ``POOL_LIMIT`` x ``batch`` of them), the ``batch``
    consecutive ones in length order with the largest total priority, best first; then every other
    candidate in ``order``."""
    if len(order) <= batch:
        return list(order)
    threshold = priority[order[batch - 1]] / p
    end = batch
    limit = min(len(order), POOL_LIMIT * batch)
    while end < limit and priority[order[end]] >= threshold:
        end += 1
    if end == batch:
        return list(order)
    pool = sorted(order[:end], key=length.__getitem__)  # stable: equal lengths keep priority order
    window = sum(priority[i] for i in pool[:batch])
    best, best_start = window, 0
    for start in range(1, len(pool) - batch + 1):
        window += priority[pool[start + batch - 1]] - priority[pool[start - 1]]
        if window > best * (1 + 1e-12):
            best, best_start = window, start
    chosen = set(pool[best_start : best_start + batch])
    first = [i for i in order[:end] if i in chosen]
    return [*first, *(i for i in order[:end] if i not in chosen), *order[end:]]


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
        share: int = 2,
        compute_density: bool = True,
        be_only_when_idle: bool = True,
        serve_by_laxity: bool = False,
        job_profile: JobProfile | None = None,
        truth: OracleTruth | None = None,
    ) -> None:
        if grouping not in GROUPINGS:
            raise ValueError(f"grouping must be one of {GROUPINGS}, got {grouping!r}")
        if p < 1:
            raise ValueError("p must be >= 1")
        if frame_steps < 1 or share < 1 or min_chunk < 1:
            raise ValueError("frame_steps, share and min_chunk must be >= 1")
        self.frame_steps = self.frame = int(frame_steps)
        self.p = float(p)
        self.grouping = grouping
        self.pace = bool(pace)
        self.budget_control = bool(budget_control)
        self.min_chunk = int(min_chunk)
        self.min_success = float(min_success)
        self.share = int(share)
        self.compute_density = bool(compute_density)
        self.be_only_when_idle = bool(be_only_when_idle)
        self.serve_by_laxity = bool(serve_by_laxity)
        self.job_profile = job_profile or JobProfile()
        self.truth = truth
        self._cache: dict[int, tuple[RequestState, _Static]] = {}
        self._cache_engine: _Engine | None = None
        self._consts: dict[str, _Constants] = {}

    def kwargs(self) -> dict[str, Any]:
        """The constructor arguments that reproduce this policy (besides job profile and truth)."""
        return {
            "frame_steps": self.frame,
            "p": self.p,
            "grouping": self.grouping,
            "pace": self.pace,
            "budget_control": self.budget_control,
            "min_chunk": self.min_chunk,
            "min_success": self.min_success,
            "share": self.share,
            "compute_density": self.compute_density,
            "be_only_when_idle": self.be_only_when_idle,
            "serve_by_laxity": self.serve_by_laxity,
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

    def _constants(self, r: RequestState) -> _Constants:
        """The lookups behind a request's static part that do not change while it decodes: SLO fields, the
        compound outlook, its true length (oracle). Keyed by request id; valid while ladder, job info,
        demotion and max_tokens are the same objects / values."""
        rid, slo, arrival, _, ladder, _, _, _, _, app, _, _, _, max_tokens, job, demoted, _ = r
        cls = slo.slo_class
        truth = self.truth
        true = truth.lengths.get(rid) if truth is not None else None
        if demoted or cls is _CLASS_BE:
            return (ladder, job, demoted, max_tokens, _BE, true, (), -1, 0, 0)
        if cls is _CLASS_LATENCY:
            assert slo.ttft_s is not None and slo.tbt_s is not None
            extra: tuple[float, ...] = (arrival + slo.ttft_s, slo.tbt_s)
            kind = _LATENCY
        elif cls is _CLASS_DEADLINE:
            assert slo.deadline_s is not None
            extra, kind = (arrival + slo.deadline_s,), _DEADLINE
        else:
            assert slo.job_deadline_s is not None and job is not None
            job_id, stage, job_arrival, calls, done = job
            if truth is not None and job_id in truth.jobs:
                outlook = truth.outlook(job_id, stage)
            else:
                outlook = self.job_profile.outlook(app, stage)
            extra = (
                job_arrival + slo.job_deadline_s, float(calls), float(done), float(outlook.prefill_tokens_after),
                float(outlook.decode_tokens_after + outlook.stages_after), outlook.tokens_after,
                outlook.prefill_total_after, outlook.decode_total_after,
            )
            kind = _COMPOUND
        return (ladder, job, demoted, max_tokens, kind, true, extra, -1, 0, 0)

    def _static(self, r: RequestState, e: _Engine) -> _Static:
        rid, _, _, prompt, ladder, _, g, computed, _, _, _, _, _, max_tokens, job, demoted, _ = r
        known = self._consts.get(rid)
        if known is None or known[0] is not ladder or known[1] != job or known[2] != demoted or known[3] != max_tokens:
            known = self._consts[rid] = self._constants(r)
        kind, true, extra, bound, k_lo, k_hi = known[4:]
        if kind == _BE:
            return _BE_STATIC
        if true is not None:
            rem = max(1, true - g)
        elif k_lo <= g < k_hi and bound > g:  # still on the same ladder step: no lookup
            rem = bound - g
        else:
            steps = ladder.steps
            index = max(0, bisect_right(steps, (g, 1 << 62)) - 1)
            k, step_bound = steps[index]
            if step_bound > g:
                k_next = steps[index + 1][0] if index + 1 < len(steps) else 1 << 62
                self._consts[rid] = (*known[:7], step_bound, k, k_next)
                rem = step_bound - g
            else:  # a runaway generation past the ladder: the contract's rule
                rem = ladder.remaining_at(g, max_tokens)
        pending = prompt + g - computed
        prefill_left = pending - 1 if g > 0 else pending
        t_pre = prefill_left * e.s_pre
        cost = prefill_left * e.c_pre + rem * (e.c_seq + e.c_kv * (prompt + g + rem / 2))
        if kind == _LATENCY:
            first_due, tbt = extra
            bonus = float(prompt) if g == 0 else 0.0
            return (_LATENCY, rem, prefill_left, cost, bonus, first_due + g * tbt - t_pre, tbt, t_pre, float(rem),
                    0.0, 0.0, first_due)
        if kind == _DEADLINE:
            return (_DEADLINE, rem, prefill_left, cost, float(prompt + g + rem), extra[0], 0.0, t_pre, float(rem),
                    0.0, 0.0, 0.0)
        due, calls, done, prefill_after, after_b, tokens_after, prefill_total, decode_total = extra
        after_a = prefill_after * e.s_pre
        value = done + calls * float(prompt + g + rem) + tokens_after
        cost = calls * cost + prefill_total * e.c_pre + decode_total * (e.c_seq + e.c_kv * (prompt + g))
        return (_COMPOUND, rem, prefill_left, cost, value, due, 0.0, t_pre + after_a, rem + after_b, after_a,
                after_b, 0.0)

    # ------------------------------------------------------------ decide
    def decide(self, snapshot: Snapshot) -> Decision:
        if not snapshot.requests:
            return Decision.empty()
        now, limits, timing = snapshot.now_s, snapshot.limits, snapshot.timing
        engine = _Engine(
            tau_floor=timing.base_s,
            s_pre=timing.recompute_s_per_token,
            c_pre=timing.per_seq_s + timing.per_prefill_token_s,
            c_seq=timing.per_seq_s + timing.base_s / max(1, limits.max_running),
            c_kv=timing.per_kv_token_s,
        )
        tau = max(timing.recent_step_s or 0.0, engine.tau_floor)
        tau_floor = engine.tau_floor
        if engine != self._cache_engine or len(self._cache) > 2 * len(snapshot.requests) + 1024:
            # new engine constants, or too many entries of requests gone: keep only the live ones
            old = self._cache if engine == self._cache_engine else {}
            self._cache = {id(r): e for r in snapshot.requests if (e := old.get(id(r))) is not None and e[0] is r}
            self._cache_engine = engine
            live = {r.request_id for r in snapshot.requests}
            self._consts = {rid: c for rid, c in self._consts.items() if rid in live}
        cache = self._cache
        static_of = self._static
        oracle = self.truth is not None
        by_compute = self.compute_density
        min_success = self.min_success

        cand: list[RequestState] = []
        cand_p: list[float] = []
        cand_s: list[_Static] = []
        best_effort: list[RequestState] = []
        reject: list[str] = []
        demote: list[str] = []
        get = cache.get
        add_cand, add_p, add_s, add_be = cand.append, cand_p.append, cand_s.append, best_effort.append
        for r in snapshot.requests:
            key = id(r)
            entry = get(key)
            if entry is None or entry[0] is not r:
                entry = cache[key] = (r, static_of(r, engine))
            st = entry[1]
            kind, rem, _, cost, value, due, tbt, need_a, need_b, _, _, _ = st
            if kind == _BE:
                add_be(r)
                continue
            if kind == _LATENCY:
                late = tau - (due - now)
                if late <= 0:
                    earn = rem + value
                elif tbt > tau:
                    earn = rem - math.ceil(late / (tbt - tau))
                else:
                    earn = 0
                if earn <= 0:
                    demote.append(r.request_id)
                    add_be(r)
                    continue
                if not by_compute:
                    cost = need_a + tau * need_b
                priority = earn / cost if cost > 0 else earn
            else:
                left = due - now
                if left <= 0:
                    reject.append(r.request_id)
                    continue
                needed = need_a + tau * need_b
                if oracle and need_a + tau_floor * need_b > left:
                    demote.append(r.request_id)  # the oracle knows it cannot make it
                    add_be(r)
                    continue
                success = left / needed if needed > left else 1.0
                if success < min_success:
                    demote.append(r.request_id)
                    add_be(r)
                    continue
                if not by_compute:
                    cost = needed
                priority = value * success / cost if cost > 0 else value
            add_cand(r)
            add_p(priority)
            add_s(st)

        # ranking: priority (stable: ties keep the snapshot's order), GMAX or SJF for the first batch
        batch = limits.max_running
        if self.grouping == "sjf":
            rems = [s[_REM] for s in cand_s]
            order = sorted(range(len(cand)), key=rems.__getitem__)
        else:
            order = sorted(range(len(cand)), key=cand_p.__getitem__, reverse=True)  # stable: ties keep order
            if self.grouping == "gmax":
                order = gmax_order(order, cand_p, [s[_REM] for s in cand_s], batch, self.p)
        slo_ordered = [cand[i] for i in order]
        best_effort.sort(key=lambda r: (r.phase is not Phase.RUNNING, *arrival_key(r)))

        priority_of = dict(zip(map(id, cand), cand_p, strict=True))
        batch_rate = sum(cand_p[i] for i in order[:batch])
        frame_s = self.frame * tau
        swap_s = timing.swap_s_per_block
        s_pre = engine.s_pre

        def worth_evicting(victim: RequestState, newcomer: RequestState) -> bool:
            _, cost = cheaper_mode(victim, limits, swap_s, s_pre)
            p_victim = priority_of.get(id(victim), 0.0)
            gain = (priority_of.get(id(newcomer), 0.0) - p_victim) * frame_s
            return gain > p_victim * (cost + tau) + cost * batch_rate

        # Paced requests share the engine's slots: up to ``share`` x B requests progress on B slots.
        admit = limits.max_running * (self.share if self.pace else 1)
        packing = pack(slo_ordered, limits, preempt=True, can_evict=worth_evicting, max_requests=admit,
                       others=best_effort, max_misfits=admit)
        if best_effort and (not self.be_only_when_idle or len(packing.run) == len(slo_ordered)):
            # every feasible SLO request is in: fill the rest with best-effort work
            packing = pack([*slo_ordered, *best_effort], limits, preempt=True, can_evict=worth_evicting,
                           max_requests=admit, max_misfits=admit)

        static_of_id = dict(zip(map(id, cand), cand_s, strict=True))
        admitted: list[tuple[RequestState, _Static]] = []
        for r in packing.run:
            found = static_of_id.get(id(r))
            if found is not None:
                admitted.append((r, found))
        run: Sequence[RequestState] = packing.run
        if self.serve_by_laxity:
            # density chose who is admitted; among them, the least slack goes first (just in time)
            run = sorted(packing.run, key=lambda r: _laxity(static_of_id.get(id(r)), now, tau))
        paces, tau_target, prefill_rate = self._frame_plan(admitted, now, tau)
        budget = None
        if self.budget_control:
            budget = self._budget(tau_target, prefill_rate, run, limits.token_budget, timing)
        mode_default = PreemptMode.SWAP if limits.swap_blocks_free > 0 and swap_s else PreemptMode.RECOMPUTE
        evictions = tuple(
            Preemption(v.request_id, cheaper_mode(v, limits, swap_s, s_pre)[0]) for v in packing.evict
        )
        return Decision(
            run=tuple(r.request_id for r in run),
            pace=paces,
            preempt=evictions,
            reject=tuple(reject),
            demote=tuple(demote),
            token_budget=budget,
            preempt_mode=mode_default,
        )

    # ------------------------------------------------------- just enough
    def assess(self, r: RequestState, st: _Static, now: float, tau: float) -> Assessment:
        """Bandwidth figures of an admitted request (priority left 0: the ranking has been made)."""
        kind, rem, prefill_left, _, _, due, tbt, need_a, _, after_a, after_b, first_due = st
        if kind == _LATENCY:
            owed = max(0.0, math.floor((now - first_due) / tbt) + 1 - r.generated) + 1.0
            spare = due - now
            n = self.frame
            tau_need = min(spare, (spare + (n - 1) * tbt) / n) if spare > 0 else tbt
            prefill_rate = prefill_left / max(tau, first_due - now) if r.generated == 0 else 0.0
            return Assessment(r, 0.0, rem, 1.0 / tbt, owed, max(tau_need, 1e-6), prefill_rate)
        stage_left = due - now - (after_a + tau * after_b) - (need_a - after_a)
        rate = rem / stage_left if stage_left > tau else 1.0 / tau
        prefill_rate = prefill_left / max(tau, stage_left - rem * tau) if prefill_left > 0 else 0.0
        return Assessment(r, 0.0, rem, rate, 1.0, math.inf, prefill_rate)

    def _frame_plan(
        self, admitted: list[tuple[RequestState, _Static]], now: float, tau: float
    ) -> tuple[tuple[Pace, ...], float, float]:
        """Paces of the admitted requests, the tightest step time the decoding chat requests allow, and the
        prefill rate the admitted newcomers need (one pass; ``assess`` spelled out for speed)."""
        paces: list[Pace] = []
        tau_target = math.inf
        prefill_rate = 0.0
        n = self.frame
        new_pace = _new_pace
        for r, st in admitted:
            g = r.generated
            kind, rem, prefill_left, _, _, due, tbt, need_a, _, after_a, after_b, first_due = st
            if kind == _LATENCY:
                owed = (now - first_due) / tbt + 1 - g
                paces.append(new_pace((r.request_id, 1.0 / tbt, (math.floor(owed) if owed > 0 else 0) + 1.0)))
                if g == 0:
                    prefill_rate += prefill_left / max(tau, first_due - now)
                elif prefill_left == 0 and r.phase is Phase.RUNNING:
                    spare = due - now
                    need = min(spare, (spare + (n - 1) * tbt) / n) if spare > 0 else tbt
                    if need < tau_target:
                        tau_target = need
                continue
            stage_left = due - now - (after_a + tau * after_b) - (need_a - after_a)
            if stage_left > rem * tau:  # it can afford to skip steps: pace it (else it needs every step)
                paces.append(new_pace((r.request_id, rem / stage_left, 1.0)))
            if prefill_left > 0:
                prefill_rate += prefill_left / max(tau, stage_left - rem * tau)
        return (tuple(paces) if self.pace else ()), max(tau_target, 1e-6), prefill_rate

    def _budget(
        self, tau_target: float, prefill_rate: float, run: Sequence[RequestState], limit: int, timing: EngineTiming
    ) -> int | None:
        """Prefill tokens per step: as many as the tightest decoding chat request's pace allows, and at least
        what the admitted newcomers need to start in time."""
        if math.isinf(tau_target):
            return None
        decodes = 0
        kv = 0
        for r in run:
            if r.generated and r.phase is Phase.RUNNING and r.prompt_tokens + r.generated - r.computed_tokens == 1:
                decodes += 1
                kv += r.computed_tokens
        per_prefill = timing.per_seq_s + timing.per_prefill_token_s
        decode_step = timing.step_time(decodes, kv)
        by_pace = (tau_target - decode_step) / per_prefill if per_prefill > 0 else limit
        by_start = prefill_rate * max(tau_target, decode_step)
        budget = max(by_pace, by_start, self.min_chunk + decodes)
        return None if budget >= limit else max(1, int(budget))


class OracleTempo(TempoPolicy):
    """Tempo with perfect information: true remaining lengths and true job graphs."""

    name = "oracle"


def _parse_params(params: dict[str, Any]) -> dict[str, Any]:
    out = dict(params)
    for key in ("frame_steps", "min_chunk", "share"):
        if key in out:
            out[key] = int(out[key])
    for key in ("p", "min_success"):
        if key in out:
            out[key] = float(out[key])
    for key in ("pace", "budget_control", "compute_density", "be_only_when_idle", "serve_by_laxity"):
        if key in out and isinstance(out[key], str):
            out[key] = out[key].strip().lower() in ("1", "true", "yes", "on")
    return out


def _tempo_factory(**fixed: Any) -> Any:
    def factory(context: PolicyContext, **params: Any) -> Policy:
        return TempoPolicy(job_profile=context.job_profile, **_parse_params({**fixed, **params}))

    return factory


def _oracle(context: PolicyContext, **params: Any) -> Policy:
    if context.truth is None:
        raise ValueError("the oracle policy needs the true lengths and job graphs (PolicyContext.truth)")
    return OracleTempo(job_profile=context.job_profile, truth=context.truth, **_parse_params(params))


register_policy("tempo", "Tempo: just-enough bandwidth, goodput priority, GMAX grouping")(_tempo_factory())
register_policy("tempo-sjf", "ablation: Tempo with SJF on the bound instead of GMAX")(_tempo_factory(grouping="sjf"))
register_policy("tempo-nopace", "ablation: Tempo without per-request pacing and prefill budget control")(
    _tempo_factory(pace=False, budget_control=False)
)
register_policy("oracle", "Tempo with the true lengths and job graphs (upper reference)")(_oracle)
