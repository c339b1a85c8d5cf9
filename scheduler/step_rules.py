"""The engine's step rule, once, for every engine (the simulator and the vLLM plug-in).

``interface.py`` promises policies what an engine does with a ``Decision`` between two decisions; this
module is that promise as code. Given the decision's run order, it picks the requests that get tokens in
one step and how many:

1. walk ``run`` and give every request that is decoding one token; a paced one only while it is within
   its pace (tokens since the decision below ``owed + rate x elapsed``), otherwise it is set aside;
2. walk ``run`` again and give every request with prompt (or recomputed) tokens left a chunk of the
   remaining budget;
3. give the set-aside decodes (ahead of their pace) the slots that are left;

at most ``slots`` requests and ``budget`` tokens per step. KV space is the engine's business: it answers
through two callbacks (the simulator reserves blocks and may preempt; vLLM allocates inside its own
scheduler, so its gate grants everything and its allocator has the last word).

Standard library only; the objects are duck-typed (``StepRequest``) so the simulator's own request records
pass through without copies: this runs once per engine step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from tempo.scheduler.interface import Phase


class StepRequest(Protocol):
    """What the step rule reads of a live request (the engine's own record, not the policy's view)."""

    id: str
    phase: Phase
    prompt: int  # prompt tokens
    generated: int  # output tokens so far
    computed: int  # tokens whose KV is cached
    pace_rate: float | None  # the decision's pace (tokens/s), None: unpaced
    pace_owed: float  # tokens owed at the decision
    used: int  # tokens emitted since the decision


R = TypeVar("R", bound=StepRequest)


def plan_step(run: Sequence[R], slots: int, budget: int, elapsed_s: float,
              reserve_decode: Callable[[R, set[str]], bool],
              reserve_chunk: Callable[[R, int], int]) -> tuple[list[R], list[tuple[R, int]]]:
    """The requests that get tokens this step: decodes (one token each) and prefill chunks, in order.

    The engine's KV cache answers through the callbacks: ``reserve_decode(request, scheduled)``: room for
    one more token of a resident decode (the engine may evict residents not in ``scheduled`` to make it);
    ``reserve_chunk(request, tokens)``: how many of ``tokens`` prefill tokens the request can take now (0:
    none this step); a waiting request that gets any is admitted.
    """
    decodes: list[R] = []
    prefills: list[tuple[R, int]] = []
    ahead: list[R] = []
    scheduled: set[str] = set()
    running = Phase.RUNNING
    for r in run:
        if slots == 0 or budget == 0:
            break
        if r.phase is not running or r.generated == 0 or r.prompt + r.generated - r.computed != 1:
            continue
        rate = r.pace_rate
        if rate is not None and r.used >= r.pace_owed + rate * elapsed_s:
            ahead.append(r)
            continue
        if not reserve_decode(r, scheduled):
            continue
        decodes.append(r)
        scheduled.add(r.id)
        slots -= 1
        budget -= 1
    for r in run:
        if slots == 0 or budget <= 0:
            break
        if r.id in scheduled:
            continue
        pending = r.prompt + r.generated - r.computed
        if r.phase is running and pending <= 1 and r.generated > 0:
            continue  # a decode (handled above, or ahead of its pace)
        chunk = reserve_chunk(r, min(pending, budget))
        if chunk <= 0:
            continue
        prefills.append((r, chunk))
        scheduled.add(r.id)
        slots -= 1
        budget -= chunk
    for r in ahead:
        if slots == 0 or budget == 0:
            break
        if not reserve_decode(r, scheduled):
            continue
        decodes.append(r)
        scheduled.add(r.id)
        slots -= 1
        budget -= 1
    return decodes, prefills
