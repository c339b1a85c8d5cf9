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

Speed: per-request state lives in numpy columns (``tempo_table``): a decision reads the snapshot's
changing fields with C-level iteration and assesses every request in a few array operations; Python
code runs per request only for what is new or changed, and for the few hundred requests it admits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import repeat
from operator import itemgetter
from typing import Any

import numpy as np
import numpy.typing as npt
from tempo.scheduler.interface import (
    Decision,
    EngineTiming,
    Pace,
    Policy,
    Preemption,
    PreemptMode,
    RequestState,
    Snapshot,
)
from tempo.scheduler.jobs import JobOutlookSource, JobProfile, OracleTruth
from tempo.scheduler.planning import cheaper_mode, pack
from tempo.scheduler.registry import PolicyContext, register_policy
from tempo.scheduler.tempo_table import BE, LATENCY, EngineConstants, Frame, RequestTable

GROUPINGS = ("gmax", "sjf", "priority")
JOB_ESTIMATES = ("graphs", "quantiles")  # how Tempo estimates the rest of a compound job
_REQUEST_ID = itemgetter(0)
POOL_LIMIT = 8  # GMAX looks at most this many batches deep into the ranking (bounds its cost)
IntArray = npt.NDArray[np.int64]


def gmax_order(order: Sequence[int] | IntArray, priority: Sequence[float] | npt.NDArray[np.float64],
               length: Sequence[float] | npt.NDArray[np.float64], batch: int, p: float) -> list[int]:
    """GMAX over candidates ``order`` (indices, best priority first): among those whose priority is within
    a factor ``p`` of the ``batch``-th best (at most ``POOL_LIMIT`` x ``batch`` of them), the ``batch``
    consecutive ones in length order with the largest total priority, best first; then every other
    candidate in ``order``."""
    chosen = _gmax(np.asarray(order, dtype=np.int64), np.asarray(priority, dtype=np.float64),
                   np.asarray(length, dtype=np.float64), batch, p)
    return [int(i) for i in chosen]


def _gmax(order: IntArray, priority: npt.NDArray[np.float64], length: npt.NDArray[np.float64], batch: int,
          p: float) -> IntArray:
    if len(order) <= batch:
        return order
    threshold = priority[order[batch - 1]] / p
    within = priority[order[batch : min(len(order), POOL_LIMIT * batch)]] >= threshold
    misses = np.flatnonzero(~within)
    end = batch + (int(misses[0]) if len(misses) else len(within))
    if end == batch:
        return order
    head = order[:end]
    pool = head[np.argsort(length[head], kind="stable")]  # equal lengths keep their rank
    sums = np.concatenate([[0.0], np.cumsum(priority[pool])])
    windows = sums[batch:] - sums[:-batch]
    best_start = int(np.argmax(windows >= windows.max() / (1 + 1e-12)))  # the first best window
    mark = np.zeros(int(head.max()) + 1, dtype=bool)
    mark[pool[best_start : best_start + batch]] = True
    chosen = mark[head]
    return np.concatenate([head[chosen], head[~chosen], order[end:]])


def _take(requests: Sequence[RequestState], rows: IntArray) -> list[RequestState]:
    """``[requests[i] for i in rows]``, in C."""
    if len(rows) > 1:
        return list(itemgetter(*rows.tolist())(requests))
    return [requests[int(i)] for i in rows]


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
        stage_deadlines: bool = False,
        job_profile: JobProfile | None = None,
        job_graphs: JobOutlookSource | None = None,
        job_estimate: str = "graphs",
        truth: OracleTruth | None = None,
    ) -> None:
        if grouping not in GROUPINGS:
            raise ValueError(f"grouping must be one of {GROUPINGS}, got {grouping!r}")
        if p < 1:
            raise ValueError("p must be >= 1")
        if job_estimate not in JOB_ESTIMATES:
            raise ValueError(f"job_estimate must be one of {JOB_ESTIMATES}, got {job_estimate!r}")
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
        self.stage_deadlines = bool(stage_deadlines)
        self.job_profile = job_profile or JobProfile()
        self.job_graphs = job_graphs
        self.job_estimate = job_estimate
        # what a compound call's job has left: the matched past graphs, else the per-app quantiles
        use_graphs = job_graphs is not None and job_estimate == "graphs"
        outlook: JobOutlookSource = job_graphs if use_graphs and job_graphs is not None else self.job_profile
        self.truth = truth
        self._table = RequestTable(outlook, truth, stage_deadlines=self.stage_deadlines)

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
            "stage_deadlines": self.stage_deadlines,
            "job_estimate": self.job_estimate,
        }

    def describe(self) -> dict[str, object]:
        return {
            **super().describe(),
            **self.kwargs(),
            "oracle": self.truth is not None,
            "job_profile_apps": sorted(self.job_profile.by_app),
            "job_outlook": "graphs" if self._table.job_outlook is self.job_graphs else "per-app quantiles",
        }

    # ------------------------------------------------------------ decide
    def decide(self, snapshot: Snapshot) -> Decision:
        requests = snapshot.requests
        if not requests:
            return Decision.empty()
        now, limits, timing = snapshot.now_s, snapshot.limits, snapshot.timing
        engine = EngineConstants(
            tau_floor=timing.base_s,
            s_pre=timing.recompute_s_per_token,
            c_pre=timing.per_seq_s + timing.per_prefill_token_s,
            c_seq=timing.per_seq_s + timing.base_s / max(1, limits.max_running),
            c_kv=timing.per_kv_token_s,
        )
        tau = max(timing.recent_step_s or 0.0, engine.tau_floor)
        table = self._table
        if len(table.slot_of) > 2 * len(requests) + 1024:
            table.forget_except([r.request_id for r in requests])
        f = table.frame(requests, engine)
        priority, reject_mask, demote_mask = self._rank(f, now, tau, engine.tau_floor)
        candidate = ~(reject_mask | demote_mask) & (f.kind != BE)
        cand = np.flatnonzero(candidate)
        reject = [requests[i].request_id for i in np.flatnonzero(reject_mask).tolist()]
        demote = [requests[i].request_id for i in np.flatnonzero(demote_mask).tolist()]
        be_rows = self._best_effort_order(f, requests, np.flatnonzero((f.kind == BE) | demote_mask))
        best_effort = _take(requests, be_rows)

        # ranking: priority (stable: ties keep the snapshot's order), GMAX or SJF for the first batch
        batch = limits.max_running
        cand_p = priority[cand]
        if self.grouping == "sjf":
            local = np.argsort(f.rem[cand], kind="stable")
        else:
            local = np.argsort(-cand_p, kind="stable")
            if self.grouping == "gmax":
                local = _gmax(local, cand_p, f.rem[cand], batch, self.p)
        order = cand[local]
        slo_ordered = _take(requests, order)

        batch_rate = float(priority[order[:batch]].sum())
        frame_s = self.frame * tau
        swap_s = timing.swap_s_per_block
        s_pre = engine.s_pre
        priority_of = table.priorities(f, np.where(candidate, priority, 0.0))  # by request id

        def worth_evicting(victim: RequestState, newcomer: RequestState) -> bool:
            _, cost = cheaper_mode(victim, limits, swap_s, s_pre)
            p_victim = priority_of(victim.request_id)
            gain = (priority_of(newcomer.request_id) - p_victim) * frame_s
            return gain > p_victim * (cost + tau) + cost * batch_rate

        # Paced requests share the engine's slots: up to ``share`` x B requests progress on B slots.
        admit = limits.max_running * (self.share if self.pace else 1)
        packing = pack(slo_ordered, limits, preempt=True, can_evict=worth_evicting, max_requests=admit,
                       others=best_effort, max_misfits=admit)
        if best_effort and (not self.be_only_when_idle or len(packing.run) == len(slo_ordered)):
            # every feasible SLO request is in: fill the rest with best-effort work
            packing = pack([*slo_ordered, *best_effort], limits, preempt=True, can_evict=worth_evicting,
                           max_requests=admit, max_misfits=admit)

        positions = np.asarray(packing.positions, dtype=np.int64)
        admitted = order[positions[positions < len(order)]]  # the SLO requests admitted, in run order
        run_rows = np.concatenate([admitted, be_rows[positions[positions >= len(order)] - len(order)]])
        run: Sequence[RequestState] = packing.run
        if self.serve_by_laxity:
            # density chose who is admitted; among them, the least slack goes first (just in time)
            laxity = np.where(f.kind == LATENCY, f.due - now - tau, f.due - now - (f.need_a + tau * f.need_b))
            slack = {id(requests[i]): float(laxity[i]) for i in admitted.tolist()}
            run = sorted(packing.run, key=lambda r: slack.get(id(r), math.inf))
        paces, tau_target, prefill_rate = self._frame_plan(f, requests, admitted, now, tau)
        budget = None
        if self.budget_control:
            budget = self._budget(tau_target, prefill_rate, f, run_rows, limits.token_budget, timing)
        mode_default = PreemptMode.SWAP if limits.swap_blocks_free > 0 and swap_s else PreemptMode.RECOMPUTE
        evictions = tuple(
            Preemption(v.request_id, cheaper_mode(v, limits, swap_s, s_pre)[0]) for v in packing.evict
        )
        return Decision(
            run=tuple(map(_REQUEST_ID, run)),
            pace=paces,
            preempt=evictions,
            reject=tuple(reject),
            demote=tuple(demote),
            token_budget=budget,
            preempt_mode=mode_default,
        )

    @staticmethod
    def _best_effort_order(f: Frame, requests: Sequence[RequestState], rows: IntArray) -> IntArray:
        """Best-effort (and demoted) requests: residents first, then first come first served."""
        keys = list(zip((~f.running[rows]).tolist(), f.start[rows].tolist(),
                        [requests[i].request_id for i in rows.tolist()], strict=True))
        return rows[sorted(range(len(keys)), key=keys.__getitem__)] if keys else rows

    def _rank(self, f: Frame, now: float, tau: float,
              tau_floor: float) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
        """Priority of every request (goodput it can still earn per second of engine time it needs), and
        who is rejected (past its deadline) or demoted (can no longer make it, or unlikely to)."""
        is_lat = f.kind == LATENCY
        slo = f.kind != BE
        with np.errstate(divide="ignore", invalid="ignore"):
            # latency: tokens still on time (all of them, if the next one can still be on time)
            late = tau - (f.due - now)
            behind = np.ceil(late / np.where(f.tbt > tau, f.tbt - tau, 1.0))
            earn_lat = np.where(late <= 0, f.rem + f.value, np.where(f.tbt > tau, f.rem - behind, 0.0))
            # deadline / compound: all or nothing, weighted by the share of the needed time that is left
            left = f.due - now
            needed = f.need_a + tau * f.need_b
            success = np.where(needed > left, left / needed, 1.0)
            earn = np.where(is_lat, earn_lat, f.value * success)
            cost = f.cost if self.compute_density else needed
            priority = np.where(cost > 0, earn / cost, earn)
        reject = slo & ~is_lat & (left <= 0)
        hopeless = ~is_lat & ~reject & (success < self.min_success)
        if self.truth is not None:  # the oracle knows when it cannot make it
            hopeless |= ~is_lat & ~reject & (f.need_a + tau_floor * f.need_b > left)
        demote = slo & ((is_lat & (earn_lat <= 0)) | hopeless)
        return priority, reject, demote

    # ------------------------------------------------------- just enough
    def _frame_plan(self, f: Frame, requests: Sequence[RequestState], admitted: IntArray, now: float,
                    tau: float) -> tuple[tuple[Pace, ...], float, float]:
        """Paces of the admitted requests (in run order), the tightest step time the decoding chat requests
        allow, and the prefill rate the admitted newcomers need to start in time."""
        if not len(admitted):
            return (), math.inf, 0.0
        kind, g, rem = f.kind[admitted], f.generated[admitted], f.rem[admitted]
        prefill_left, due, tbt = f.prefill_left[admitted], f.due[admitted], f.tbt[admitted]
        first_due, running = f.first_due[admitted], f.running[admitted]
        is_lat = kind == LATENCY
        n = self.frame
        with np.errstate(divide="ignore", invalid="ignore"):
            # chat: its TBT pace plus the tokens already owed; the step time that keeps it on schedule
            owed = (now - first_due) / tbt + 1 - g
            owed = np.where(owed > 0, np.floor(owed), 0.0) + 1.0
            spare = due - now
            need = np.where(spare > 0, np.minimum(spare, (spare + (n - 1) * tbt) / n), tbt)
            decoding = is_lat & (g > 0) & (prefill_left == 0) & running
            tau_target = float(need[decoding].min()) if decoding.any() else math.inf
            # deadline / compound: the remaining bound over the time its stage has left
            stage_left = due - now - (f.after_a[admitted] + tau * f.after_b[admitted]) - (
                f.need_a[admitted] - f.after_a[admitted])
            prefill_rate = float(np.sum(np.where(is_lat & (g == 0), prefill_left / np.maximum(tau, first_due - now),
                                                 0.0)))
            prefill_rate += float(np.sum(np.where(~is_lat & (prefill_left > 0),
                                                  prefill_left / np.maximum(tau, stage_left - rem * tau), 0.0)))
            rate = np.where(is_lat, 1.0 / tbt, rem / stage_left)
        if not self.pace:
            return (), max(tau_target, 1e-6), prefill_rate
        paced = is_lat | (stage_left > rem * tau)  # one that cannot afford to skip steps needs every step: no pace
        ids = map(_REQUEST_ID, _take(requests, admitted[paced]))
        fields = zip(ids, rate[paced].tolist(), np.where(is_lat, owed, 1.0)[paced].tolist(), strict=True)
        paces = tuple(map(tuple.__new__, repeat(Pace), fields))  # Pace(*fields), without its Python-level call
        return paces, max(tau_target, 1e-6), prefill_rate

    def _budget(self, tau_target: float, prefill_rate: float, f: Frame, run_rows: IntArray, limit: int,
                timing: EngineTiming) -> int | None:
        """Prefill tokens per step: as many as the tightest decoding chat request's pace allows, and at least
        what the admitted newcomers need to start in time."""
        if math.isinf(tau_target):
            return None
        decoding = (f.generated[run_rows] > 0) & f.running[run_rows] & (f.prefill_left[run_rows] == 0)
        decodes = int(decoding.sum())
        kv = int(f.computed[run_rows][decoding].sum())
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
    for key in ("pace", "budget_control", "compute_density", "be_only_when_idle", "serve_by_laxity",
                "stage_deadlines"):
        if key in out and isinstance(out[key], str):
            out[key] = out[key].strip().lower() in ("1", "true", "yes", "on")
    return out


def _tempo_factory(**fixed: Any) -> Any:
    def factory(context: PolicyContext, **params: Any) -> Policy:
        return TempoPolicy(job_profile=context.job_profile, job_graphs=context.job_graphs,
                           **_parse_params({**fixed, **params}))

    return factory


def _oracle(context: PolicyContext, **params: Any) -> Policy:
    if context.truth is None:
        raise ValueError("the oracle policy needs the true lengths and job graphs (PolicyContext.truth)")
    return OracleTempo(job_profile=context.job_profile, job_graphs=context.job_graphs, truth=context.truth,
                       **_parse_params(params))


register_policy("tempo", "Tempo: just-enough bandwidth, goodput priority, GMAX grouping")(_tempo_factory())
register_policy("tempo-sjf", "ablation: Tempo with SJF on the bound instead of GMAX")(_tempo_factory(grouping="sjf"))
register_policy("tempo-nopace", "ablation: Tempo without per-request pacing and prefill budget control")(
    _tempo_factory(pace=False, budget_control=False)
)
register_policy("tempo-quantiles", "ablation: Tempo with per-app quantiles of past jobs instead of graph matching")(
    _tempo_factory(job_estimate="quantiles")
)
register_policy("oracle", "Tempo with the true lengths and job graphs (upper reference)")(_oracle)
