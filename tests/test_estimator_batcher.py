"""Micro-batching of single estimates: one model call for concurrent requests, each gets its own answer."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import pytest
from tempo.estimator.batcher import MicroBatcher


class Doubler:
    """A 'model' that doubles numbers, slowly, and refuses negative ones."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []
        self.lock = threading.Lock()

    def __call__(self, xs: Sequence[int]) -> list[int]:
        with self.lock:
            self.calls.append(list(xs))
        time.sleep(0.01)
        if any(x < 0 for x in xs):
            raise ValueError("negative")
        return [2 * x for x in xs]


def test_concurrent_requests_share_model_calls_and_get_their_own_answers() -> None:
    model = Doubler()

    async def main() -> list[int]:
        batcher = MicroBatcher(model, max_batch=16)
        return await asyncio.gather(*(batcher.submit(i) for i in range(50)))

    assert asyncio.run(main()) == [2 * i for i in range(50)]
    assert len(model.calls) < 10 and max(map(len, model.calls)) <= 16
    assert sorted(x for call in model.calls for x in call) == list(range(50))


def test_a_lone_request_is_computed_at_once() -> None:
    model = Doubler()

    async def main() -> tuple[int, float]:
        batcher = MicroBatcher(model)
        start = time.perf_counter()
        return await batcher.submit(21), time.perf_counter() - start

    result, _ = asyncio.run(main())
    assert result == 42 and model.calls == [[21]]


def test_a_bad_request_fails_alone() -> None:
    model = Doubler()

    async def main() -> list[object]:
        batcher = MicroBatcher(model, max_batch=8)
        return await asyncio.gather(*(batcher.submit(x) for x in (1, -1, 3, 4)), return_exceptions=True)

    first, bad, *rest = asyncio.run(main())
    assert first == 2 and rest == [6, 8]
    assert isinstance(bad, ValueError)


def test_max_batch_must_be_positive() -> None:
    with pytest.raises(ValueError):
        MicroBatcher(Doubler(), max_batch=0)
