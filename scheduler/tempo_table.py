"""Tempo's per-request state as numpy columns, so that a decision over thousands of requests costs a few
array operations instead of a Python loop per request.

A request's row holds what does not change while it decodes (its SLO fields, the compound outlook, its
true length for the oracle, the ladder step it was last seen on) and the state fields it was last seen
with. Rows are found by the identity of the state object, which the engine reuses while a request is
unchanged, so a decision costs a dictionary lookup per request plus array operations; Python code runs
per request only for states not seen before (the running batch, each step) and for requests that moved
to another ladder step.

The arithmetic is the policy's (see ``tempo_policy``'s module docstring); this module only lays it out.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import compress, repeat
from operator import eq, is_, itemgetter, not_

import numpy as np
import numpy.typing as npt
from tempo.scheduler.interface import JobInfo, Phase, RequestState
from tempo.scheduler.jobs import JobOutlookSource, OracleTruth, StageOutlook
from tempo.scheduler.slo import SLOClass

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

BE, LATENCY, DEADLINE, COMPOUND = 0, 1, 2, 3
_CLASS_BE, _CLASS_LATENCY, _CLASS_DEADLINE = SLOClass.BEST_EFFORT, SLOClass.LATENCY, SLOClass.DEADLINE
_FAR = float(1 << 62)
_OUTLOOKS_KEPT = 4096  # (job, stage) outlooks cached: a job's siblings and later states reuse them

# columns of the constant table, by position
(KIND, PROMPT, TRUE, FIRST_DUE, TBT, DUE, CALLS, DONE, PREFILL_AFTER, AFTER_B, TOKENS_AFTER, PREFILL_TOTAL,
 DECODE_TOTAL, BOUND, K_LO, K_HI, START,  # constants while the ladder step, job and demotion are the same
 GENERATED, COMPUTED, RUNNING,  # the state last seen
 F_REM, F_PREFILL_LEFT, F_COST, F_VALUE, F_DUE, F_NEED_A, F_NEED_B, F_AFTER_A, F_AFTER_B,  # derived from both
 ) = range(29)
N_COLUMNS = 29

_ID, _PHASE, _GENERATED, _COMPUTED = (itemgetter(i) for i in (0, 5, 6, 7))
_KEY = itemgetter(4, 14, 15)  # ladder, job, demoted: what a row's constants are built from
_UNSEEN = (None,) * 4 + (object(),) + (None,) * 12  # the "last state" of a new row: its key matches nothing


@dataclass(frozen=True, slots=True)
class EngineConstants:
    """The engine figures the assessment depends on (seconds)."""

    tau_floor: float  # fastest possible step (a lone short decode)
    s_pre: float  # wall time per prefill token, prefilling alone in full chunks
    c_pre: float  # engine time a prefill token adds to a step
    c_seq: float  # engine time a decode token adds (linear layers + its share of the step overhead)
    c_kv: float  # engine time per cached token a decode reads


@dataclass(slots=True)
class Frame:
    """Every live request's figures for this decision, in snapshot order."""

    kind: IntArray
    rem: FloatArray  # remaining-length bound (the truth for the oracle)
    generated: FloatArray
    computed: FloatArray  # tokens whose KV is cached
    prefill_left: FloatArray  # tokens to (re)compute before its next token
    cost: FloatArray  # engine time it still needs (compound: with the rest of its job)
    value: FloatArray  # deadline/compound: tokens it earns if met; latency: the prompt, earned with the TTFT
    due: FloatArray  # latency: when the next token is due, less its prefill time; else the (job) deadline
    tbt: FloatArray
    need_a: FloatArray  # time it needs = need_a + tau * need_b
    need_b: FloatArray
    after_a: FloatArray  # compound: the rest of the job = after_a + tau * after_b
    after_b: FloatArray
    first_due: FloatArray  # latency: arrival + TTFT
    start: FloatArray  # arrival (compound: the job's), for first-come-first-served order
    running: BoolArray
    rows: IntArray  # each request's row in the table


class RequestTable:
    """Rows of per-request constants, keyed by request id (slots are reused once a request is gone)."""

    def __init__(self, job_outlook: JobOutlookSource, truth: OracleTruth | None = None, capacity: int = 1024,
                 stage_deadlines: bool = False) -> None:
        self.job_outlook = job_outlook
        # a compound call is due by its stage's sub-deadline (phi(s) of the job deadline, where the outlook
        # gives one) instead of by the job deadline less the time the rest of the job needs
        self.stage_deadlines = stage_deadlines
        self.truth = truth
        # (job id, stage, calls released in it) -> outlook: the job's history is fixed for a stage, and a
        # matcher's answer costs more than a row
        self._outlooks: OrderedDict[tuple[str, int, int], StageOutlook] = OrderedDict()
        self.table = np.zeros((capacity, N_COLUMNS))
        self.slot_of: dict[str, int] = {}  # request id -> row
        # The engine hands over the same (immutable) state object while a request is unchanged: a row is
        # current while the identity of its last state matches. ``states`` keeps those states (and their
        # ladders and jobs) alive, so that their ids stay unique.
        self.states: list[RequestState | None] = [None] * capacity
        self.slot_of_state: dict[int, int] = {}  # id of a row's last state -> row
        self.free: list[int] = list(range(capacity - 1, -1, -1))
        self._engine: EngineConstants | None = None  # the constants the derived columns were computed with

    # ------------------------------------------------------------------ rows
    def _slot(self, request_id: str) -> int:
        slot = self.slot_of.get(request_id)
        if slot is None:
            if not self.free:
                self._grow()
            slot = self.slot_of[request_id] = self.free.pop()
        return slot

    def _grow(self) -> None:
        old = len(self.table)
        self.table = np.vstack([self.table, np.zeros((old, N_COLUMNS))])
        self.states.extend([None] * old)
        self.free.extend(range(2 * old - 1, old - 1, -1))

    def forget_except(self, live: Sequence[str]) -> None:
        """Free the rows of requests that are gone."""
        keep = set(live)
        for rid in [rid for rid in self.slot_of if rid not in keep]:
            slot = self.slot_of.pop(rid)
            state = self.states[slot]
            if state is not None:
                del self.slot_of_state[id(state)]
            self.states[slot] = None
            self.free.append(slot)

    def _write(self, slot: int, r: RequestState) -> None:
        """The constant row of a request (new, or its ladder / job / demotion changed)."""
        rid, slo, arrival, prompt, _, _, _, _, _, app, _, _, _, _, job, demoted, _ = r
        row = self.table[slot]
        row[:] = 0.0
        row[PROMPT] = prompt
        row[TRUE] = np.nan
        row[START] = job.job_arrival_s if job is not None else arrival  # FCFS order of best effort
        truth = self.truth
        if truth is not None and (true := truth.lengths.get(rid)) is not None:
            row[TRUE] = true
        cls = slo.slo_class
        if demoted or cls is _CLASS_BE:
            row[KIND] = BE
        elif cls is _CLASS_LATENCY:
            assert slo.ttft_s is not None and slo.tbt_s is not None
            row[KIND], row[FIRST_DUE], row[TBT] = LATENCY, arrival + slo.ttft_s, slo.tbt_s
        elif cls is _CLASS_DEADLINE:
            assert slo.deadline_s is not None
            row[KIND], row[DUE] = DEADLINE, arrival + slo.deadline_s
        else:
            assert slo.job_deadline_s is not None and job is not None
            job_id, stage, job_arrival, calls, done, _, _ = job
            if truth is not None and job_id in truth.jobs:
                outlook = truth.outlook(job_id, stage)
            else:
                outlook = self._outlook(app, job)
            row[KIND], row[DUE], row[CALLS], row[DONE] = COMPOUND, job_arrival + slo.job_deadline_s, calls, done
            phi = outlook.sub_deadline_fraction
            if self.stage_deadlines and phi is not None:
                row[DUE] = job_arrival + phi * slo.job_deadline_s
            else:
                row[PREFILL_AFTER] = outlook.prefill_tokens_after
                row[AFTER_B] = outlook.decode_tokens_after + outlook.stages_after
            row[TOKENS_AFTER] = outlook.tokens_after
            row[PREFILL_TOTAL] = outlook.prefill_total_after
            row[DECODE_TOTAL] = outlook.decode_total_after

    def _outlook(self, app: str, job: JobInfo) -> StageOutlook:
        key = (job.job_id, job.stage, len(job.stage_prompts))
        outlook = self._outlooks.get(key)
        if outlook is None:
            outlook = self._outlooks[key] = self.job_outlook.outlook(app, job.stage, job.history, job.stage_prompts)
            if len(self._outlooks) > _OUTLOOKS_KEPT:
                self._outlooks.popitem(last=False)
        return outlook

    def _step_bound(self, slot: int, r: RequestState) -> float:
        """Remaining-length bound of a request that left its cached ladder step (caches the new step)."""
        g = r.generated
        steps = r.ladder.steps
        index = max(0, bisect_right(steps, (g, 1 << 62)) - 1)
        k, bound = steps[index]
        row = self.table[slot]
        if bound > g:
            row[BOUND], row[K_LO] = bound, k
            row[K_HI] = steps[index + 1][0] if index + 1 < len(steps) else _FAR
            return float(bound - g)
        row[K_LO], row[K_HI] = 0.0, 0.0  # a runaway generation past the ladder: the contract's rule each time
        return float(r.ladder.remaining_at(g, r.max_tokens))

    def priorities(self, f: Frame, priority: FloatArray) -> Callable[[str], float]:
        """A lookup of this frame's priority by request id (0 for a request not in the frame)."""
        by_row = np.zeros(len(self.table))
        by_row[f.rows] = priority
        slot_of = self.slot_of

        def lookup(request_id: str) -> float:
            slot = slot_of.get(request_id)
            return float(by_row[slot]) if slot is not None else 0.0

        return lookup

    # ------------------------------------------------------------------ frame
    def _refresh(self, slots: IntArray, changed: IntArray, requests: Sequence[RequestState]) -> None:
        """Bring the rows of states not seen before up to date (new requests; the running batch's next
        states): the state fields always, the constants only when the ladder, job or demotion changed."""
        states = [requests[i] for i in changed.tolist()]
        rows = np.array(list(map(self.slot_of.get, map(_ID, states), repeat(-1))), dtype=np.int64)
        row_list = rows.tolist()
        olds = [self.states[i] if i >= 0 else _UNSEEN for i in row_list]
        # the constants hold while ladder (by identity), job (by value) and demotion are those of the last state
        same = list(map(eq, map(_KEY, states), map(_KEY, olds)))
        for j in compress(range(len(states)), map(not_, same)):
            r = states[j]
            slot = row_list[j] if row_list[j] >= 0 else self._slot(r.request_id)
            self._write(slot, r)
            row_list[j] = slot
        rows = np.array(row_list, dtype=np.int64)
        slots[changed] = rows
        known = self.slot_of_state
        for old in olds:
            if old is not _UNSEEN:
                del known[id(old)]
        list(map(self.states.__setitem__, row_list, states))
        known.update(zip(map(id, states), row_list, strict=True))
        table = self.table
        table[rows, GENERATED] = list(map(_GENERATED, states))
        table[rows, COMPUTED] = list(map(_COMPUTED, states))
        table[rows, RUNNING] = list(map(is_, map(_PHASE, states), repeat(Phase.RUNNING)))

    def _derive(self, rows: IntArray, states: Sequence[RequestState], e: EngineConstants) -> None:
        """The frame figures of ``rows`` (whose last states are ``states``) from their constants and state."""
        table = self.table
        c = table[rows]
        g, computed = c[:, GENERATED], c[:, COMPUTED]
        kind = c[:, KIND]
        prompt, true = c[:, PROMPT], c[:, TRUE]
        bound, k_lo, k_hi = c[:, BOUND], c[:, K_LO], c[:, K_HI]
        rem = np.where(np.isnan(true), bound - g, np.maximum(1.0, true - g))
        off_step = (kind != BE) & np.isnan(true) & ((g < k_lo) | (g >= k_hi) | (bound <= g))
        for i in np.flatnonzero(off_step).tolist():
            rem[i] = self._step_bound(int(rows[i]), states[i])
        pending = prompt + g - computed
        prefill_left = np.where(g > 0, pending - 1, pending)
        t_pre = prefill_left * e.s_pre
        cost = prefill_left * e.c_pre + rem * (e.c_seq + e.c_kv * (prompt + g + rem / 2))
        is_lat, is_comp = kind == LATENCY, kind == COMPOUND
        after_a = np.where(is_comp, c[:, PREFILL_AFTER] * e.s_pre, 0.0)
        after_b = np.where(is_comp, c[:, AFTER_B], 0.0)
        calls = c[:, CALLS]
        value = np.where(is_lat, np.where(g == 0, prompt, 0.0),
                         np.where(is_comp, c[:, DONE] + calls * (prompt + g + rem) + c[:, TOKENS_AFTER],
                                  prompt + g + rem))
        cost = np.where(is_comp, calls * cost + c[:, PREFILL_TOTAL] * e.c_pre
                        + c[:, DECODE_TOTAL] * (e.c_seq + e.c_kv * (prompt + g)), cost)
        due = np.where(is_lat, c[:, FIRST_DUE] + g * c[:, TBT] - t_pre, c[:, DUE])
        table[rows, F_REM:F_AFTER_B + 1] = np.column_stack(
            [rem, prefill_left, cost, value, due, t_pre + after_a, rem + after_b, after_a, after_b])

    def frame(self, requests: Sequence[RequestState], e: EngineConstants) -> Frame:
        """Every request's figures: derived again for the states not seen before, or for every request when
        the engine's constants changed."""
        slots = np.array(list(map(self.slot_of_state.get, map(id, requests), repeat(-1))), dtype=np.int64)
        changed = np.flatnonzero(slots < 0)
        if len(changed):
            self._refresh(slots, changed, requests)
        if e != self._engine:
            self._engine = e
            self._derive(slots, requests, e)
        elif len(changed):
            self._derive(slots[changed], [requests[i] for i in changed.tolist()], e)
        c = self.table[slots]
        return Frame(c[:, KIND].astype(np.int64), c[:, F_REM], c[:, GENERATED], c[:, COMPUTED], c[:, F_PREFILL_LEFT],
                     c[:, F_COST], c[:, F_VALUE], c[:, F_DUE], c[:, TBT], c[:, F_NEED_A], c[:, F_NEED_B],
                     c[:, F_AFTER_A], c[:, F_AFTER_B], c[:, FIRST_DUE], c[:, START], c[:, RUNNING] > 0, slots)
