"""How late the API server's event loop runs (``tempo_event_loop_lag_seconds``).

Every request, refusals included, waits for the one event loop of vLLM's API server. A task that asks to
wake every ``interval_s`` and times how late it woke measures what any request arriving then waited
before its first line ran: a garbage collection, a long tokenization, vLLM's output handler working
through a step's outputs, or the process not getting a core. The refusal-time target (< 100 ms) is a
target for this lag, whatever its cause; the soak reads it from ``/metrics``. The load generator watches
its own loop the same way: a refusal it timed across a stall of its own says little about the server.
``run_queue_wait_s`` tells a stall's two causes apart: the time the thread sat runnable without a core.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any


async def watch(observe: Callable[[float, float], None], interval_s: float = 0.02) -> None:
    """Call ``observe(woke_at, lag)`` (monotonic seconds) at each wake-up, ``lag`` its delay past
    ``interval_s``, until cancelled."""
    while True:
        asked = time.monotonic()
        await asyncio.sleep(interval_s)
        woke = time.monotonic()
        observe(woke, max(0.0, woke - asked - interval_s))


def start(histogram: Any, longest: Any = None, interval_s: float = 0.02) -> asyncio.Task[None]:
    """The watcher observing lags in ``histogram`` (and the longest so far in the gauge ``longest``), as a
    task of the running loop (call from a coroutine); the caller keeps the task."""
    worst = [0.0]

    def observe(_: float, lag: float) -> None:
        histogram.observe(lag)
        if longest is not None and lag > worst[0]:
            worst[0] = lag
            longest.set(lag)

    return asyncio.get_running_loop().create_task(watch(observe, interval_s), name="tempo-loop-lag")


def run_queue_wait_s() -> float | None:
    """Seconds the calling thread has waited, runnable, for a core since it started (Linux schedstat;
    None where there is none)."""
    try:
        with open("/proc/thread-self/schedstat", encoding="ascii") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return None
