"""The API server's garbage-collector pauses: measured (``tempo_gc_pause_seconds``) and kept short.

One event loop in vLLM's API server answers every request, refusals included, so a full collection stops
them all for as long as it takes to traverse every object the process tracks, most of them the modules
(torch, vLLM, transformers, the tokenizer) that live as long as the process. vLLM freezes its engine core's
heap once it is up (``vllm.utils.gc_utils.freeze_gc_heap``), not the API server's. ``install`` does the
same here: what exists once the server is up moves to the permanent generation, and later collections
traverse only what was allocated since.
"""

from __future__ import annotations

import gc
import time
from collections import deque
from typing import Any

# Pauses wait here until ``drain`` puts them in the histogram: the collector may run while a metric's
# (non-reentrant) lock is held, so the callback itself takes no lock.
_pending: deque[tuple[str, float]] = deque(maxlen=10_000)
_installed = False


def install(freeze: bool = True) -> None:
    """Once per process: time every collection and, with ``freeze``, collect once and freeze what is left
    (vLLM's ``freeze_gc_heap``). Call when start-up is done."""
    global _installed
    if _installed:
        return
    _installed = True
    if freeze:
        for generation in (0, 1, 2):
            gc.collect(generation)
        gc.freeze()
    started = [0.0]

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            _pending.append((str(info["generation"]), time.perf_counter() - started[0]))

    gc.callbacks.append(callback)


def pending() -> bool:
    return bool(_pending)


def drain(histogram: Any) -> None:
    """Observe the pauses timed since the last call in ``histogram`` (labelled by generation)."""
    while _pending:
        generation, seconds = _pending.popleft()
        histogram.labels(generation).observe(seconds)
