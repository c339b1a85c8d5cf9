"""Small pure functions the policies compose: deadlines, ordering keys, packing into capacity, victims.

A new policy is an ordering (and perhaps an admission rule) plus ``pack``: it should rarely need more.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import compress, repeat
from operator import is_, itemgetter

from tempo.scheduler.interface import Decision, EngineLimits, Phase, Preemption, PreemptMode, RequestState
from tempo.scheduler.slo import SLOClass

INF = math.inf
# enum members bound once (a class-attribute lookup on an Enum costs ~0.2 us, per request per decision)
_BEST_EFFORT, _LATENCY, _DEADLINE = SLOClass.BEST_EFFORT, SLOClass.LATENCY, SLOClass.DEADLINE
_PHASE = itemgetter(5)  # RequestState.phase, read in C over long queues
# vLLM keeps this share of the KV cache free when admitting new requests, so running ones can grow.
WATERMARK_FRACTION = 0.01


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size) if tokens > 0 else 0


def kv_need(request: RequestState, block_size: int) -> int:
    """Blocks a request must get before it can make progress: none when resident, its swapped blocks
    when swapped, else the blocks of everything it has to (re)compute plus its next token."""
    if request.phase is Phase.RUNNING:
        return 0
    if request.phase is Phase.SWAPPED:
        return request.kv_blocks
    return blocks_for(request.prompt_tokens + request.generated + 1, block_size)


def slo_deadline(request: RequestState) -> float:
    """Absolute time of the request's next obligation: the next token's due time (latency), the response
    deadline (deadline) or the job deadline (compound); infinity for best effort."""
    slo = request.slo
    cls = slo.slo_class
    if request.demoted or cls is _BEST_EFFORT:
        return INF
    if cls is _LATENCY:
        assert slo.ttft_s is not None and slo.tbt_s is not None
        return request.arrival_s + slo.ttft_s + request.generated * slo.tbt_s
    if cls is _DEADLINE:
        assert slo.deadline_s is not None
        return request.arrival_s + slo.deadline_s
    assert slo.job_deadline_s is not None
    start = request.job.job_arrival_s if request.job is not None else request.arrival_s
    return start + slo.job_deadline_s


def arrival_key(request: RequestState) -> tuple[float, str]:
    """FCFS order (compound calls by their job's arrival, so a job's later stages keep its place)."""
    start = request.job.job_arrival_s if request.job is not None else request.arrival_s
    return (start, request.request_id)


def residents(requests: Iterable[RequestState]) -> list[RequestState]:
    return [r for r in requests if r.phase is Phase.RUNNING]


@dataclass(frozen=True, slots=True)
class Packing:
    """Requests admitted (in order) and residents to evict so that they fit."""

    run: tuple[RequestState, ...]
    evict: tuple[RequestState, ...] = ()
    positions: tuple[int, ...] = ()  # where each of ``run`` stands in the ``ordered`` it was packed from


def pack(
    ordered: Sequence[RequestState],
    limits: EngineLimits,
    *,
    preempt: bool = False,
    stop_at_blocked: bool = False,
    others: Sequence[RequestState] = (),
    can_evict: Callable[[RequestState, RequestState], bool] | None = None,
    max_requests: int | None = None,
    max_misfits: int | None = None,
) -> Packing:
    """Admit ``ordered`` in order into ``max_requests`` (default: ``max_running``) and the free KV blocks.

    Residents already hold their blocks. A non-resident needs ``kv_need`` blocks from the free pool (less
    a vLLM-style watermark). With ``preempt``, residents ranked after it (or not in ``ordered``: pass them as
    ``others``) are evicted to make room, lowest first, when ``can_evict(victim, newcomer)`` allows.
    ``stop_at_blocked``: stop at the first request that does not fit (vLLM's FCFS head-of-line rule).
    ``max_misfits``: after that many newcomers in a row did not fit, stop looking for newcomers (residents
    further down are still admitted): bounds the work when thousands wait on a full cache.
    """
    slots = limits.max_running if max_requests is None else max_requests
    watermark = int(limits.kv_blocks_total * WATERMARK_FRACTION)
    free = limits.kv_blocks_free - watermark
    block = limits.block_size
    running = Phase.RUNNING
    run: list[RequestState] = []
    run_at: list[int] = []
    evicted: list[RequestState] = []
    evicted_ids: set[str] = set()
    pool: list[RequestState] | None = None  # eviction candidates: unwanted ones first, then by rank
    rank: dict[str, int] = {}
    refused = not preempt  # once an eviction is refused, lower-ranked newcomers do not try again
    misfits = 0
    misfit_cap = max_misfits if max_misfits is not None else len(ordered) + 1
    look_past_full = not stop_at_blocked
    n_run = 0
    swapped = Phase.SWAPPED
    for position, request in enumerate(ordered):
        if n_run >= slots:
            break
        if misfits >= misfit_cap or (refused and free <= 0 and look_past_full):
            # no more newcomers (too many in a row did not fit, or none can fit now): the residents further
            # down keep their place while slots remain
            later = map(is_, map(_PHASE, ordered[position:]), repeat(running))
            rest = [i for i in compress(range(position, len(ordered)), later)
                    if ordered[i].request_id not in evicted_ids][: slots - n_run]
            run.extend(ordered[i] for i in rest)
            run_at.extend(rest)
            break
        phase = request.phase
        if phase is running:
            if not evicted_ids or request.request_id not in evicted_ids:
                run.append(request)
                run_at.append(position)
                n_run += 1
            continue
        if refused and free <= 0:
            break  # stop_at_blocked (otherwise handled above)
        # kv_need, inlined: this loop can see tens of thousands of waiting requests
        need = request.kv_blocks if phase is swapped else -(-(request.prompt_tokens + request.generated + 1) // block)
        if need > free and not refused:
            if pool is None:
                positions = list(compress(range(len(ordered)), map(is_, map(_PHASE, ordered), repeat(running))))
                ranked = [ordered[i] for i in positions]
                rank = {r.request_id: i for i, r in zip(positions, ranked, strict=True)}
                pool = [r for r in others if r.phase is running and r.request_id not in rank]
                pool += ranked
            # choose victims tentatively (unwanted residents first, then the lowest-ranked resident while it
            # ranks below this request) and evict them only if together they make room
            front, back, gained = 0, len(pool) - 1, 0
            while need > free + gained and front <= back:
                if pool[front].request_id not in rank:
                    victim, front = pool[front], front + 1
                elif rank[pool[back].request_id] > position:
                    victim, back = pool[back], back - 1
                else:
                    break
                if can_evict is not None and not can_evict(victim, request):
                    break
                gained += victim.kv_blocks
            if need <= free + gained:
                chosen = pool[:front] + pool[back + 1 :]
                pool = pool[front : back + 1]
                evicted.extend(chosen)
                evicted_ids.update(v.request_id for v in chosen)
                free += gained
            else:
                refused = True
        if need <= free:
            run.append(request)
            run_at.append(position)
            n_run += 1
            free -= need
            misfits = 0
        elif stop_at_blocked:
            break
        else:
            misfits += 1
    return Packing(tuple(run), tuple(evicted), tuple(run_at))


def decision_from(
    packing: Packing,
    *,
    mode: PreemptMode = PreemptMode.RECOMPUTE,
    reject: Sequence[str] = (),
    demote: Sequence[str] = (),
    token_budget: int | None = None,
    note: str = "",
) -> Decision:
    return Decision(
        run=tuple(r.request_id for r in packing.run),
        preempt=tuple(Preemption(r.request_id, mode) for r in packing.evict),
        reject=tuple(reject),
        demote=tuple(demote),
        token_budget=token_budget,
        preempt_mode=mode,
        note=note,
    )


def cheaper_mode(request: RequestState, limits: EngineLimits, swap_s_per_block: float | None,
                 recompute_s_per_token: float) -> tuple[PreemptMode, float]:
    """Recompute or swap, whichever costs less engine time, and that cost in seconds."""
    recompute = (request.prompt_tokens + request.generated) * recompute_s_per_token
    if swap_s_per_block is not None and limits.swap_blocks_free >= request.kv_blocks:
        swap = 2 * request.kv_blocks * swap_s_per_block  # out now, back in later
        if swap < recompute:
            return PreemptMode.SWAP, swap
    return PreemptMode.RECOMPUTE, recompute
