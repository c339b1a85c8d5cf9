"""SLO calibration against a stand-in engine that coalesces tokens into chunks and caches prefixes, as
vLLM's server does: the measured inter-token time and prefill rate are the engine's, not the chunking's."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from tempo.serving.bench.calibrate import measure_engine

from tests.conftest import serve_asgi

ITL_S, PREFILL_PER_TOKEN_S, CHUNK = 0.004, 0.0002, 4


class CoalescingEngine:
    """Prefill costs PREFILL_PER_TOKEN_S per uncached prompt token (a prompt seen before costs nothing);
    tokens come ITL_S apart, sent CHUNK at a time with cumulative usage."""

    def __init__(self, stalls: int = 0) -> None:
        self.seen: set[tuple[int, ...]] = set()
        self.stalls = stalls  # the first ``stalls`` long streams arrive all at once, as from a stalled server loop

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        body = json.loads((await receive())["body"])
        prompt = tuple(body["prompt"])
        await asyncio.sleep(0 if prompt in self.seen else PREFILL_PER_TOKEN_S * len(prompt))
        self.seen.add(prompt)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        n, sent = body["max_tokens"], 0
        stalled = n > 60 and self.stalls > 0
        if stalled:
            self.stalls -= 1
            await asyncio.sleep(ITL_S * n)
        await self._chunk(send, 1)
        sent = 1
        while sent < n:
            step = min(CHUNK, n - sent)
            await asyncio.sleep(0 if stalled else ITL_S * step)
            sent += step
            await self._chunk(send, sent)
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    @staticmethod
    async def _chunk(send: Any, tokens: int) -> None:
        chunk = {"choices": [{"text": "x" * tokens}], "usage": {"completion_tokens": tokens}}
        await send({"type": "http.response.body", "body": f"data: {json.dumps(chunk)}\n\n".encode(), "more_body": True})


@pytest.fixture
def engine_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """The stand-in behind a real HTTP server; ``indirect`` parameter: how many long streams stall."""
    with serve_asgi(CoalescingEngine(getattr(request, "param", 0))) as url:
        yield url


def test_calibration_reads_the_engine_through_coalesced_chunks_and_a_warm_cache(engine_url: str) -> None:
    first = asyncio.run(measure_engine(engine_url, "m", max_prompt=1024, burst=2))
    again = asyncio.run(measure_engine(engine_url, "m", max_prompt=1024, burst=2))
    for measured in (first, again):  # the second run is not fooled by the prompts the first one cached
        assert measured["inter_token_s"] == pytest.approx(ITL_S, rel=0.25)
        assert measured["ttft_per_prompt_token_s"] == pytest.approx(PREFILL_PER_TOKEN_S, rel=0.25)


@pytest.mark.parametrize("engine_url", [1], indirect=True)
def test_one_stalled_stream_does_not_set_the_inter_token_time(engine_url: str) -> None:
    measured = asyncio.run(measure_engine(engine_url, "m", max_prompt=1024, burst=2))
    assert measured["inter_token_s"] == pytest.approx(ITL_S, rel=0.25)  # not ~0: its tokens came at once
