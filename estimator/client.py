"""Async client for serving: connection-pooled, short timeout, batched; never blocks serving for long.

When the service is slow or down, ``ladders`` answers with a fallback bound (the per-class q-quantile of
the completions this client has recorded recently, or a default) flagged ``fallback=True``. Completion
records that cannot be written are buffered (bounded, oldest dropped first and counted) and retried
by ``flush`` or the next ``record_completion``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import httpx
from tempo.estimator.engine import FallbackBounds
from tempo.scheduler.bounds import BoundLadder, BoundQuery


class EstimatorClient:
    def __init__(self, base_url: str, timeout_s: float = 0.05, max_batch: int = 256, quantile: float = 0.9,
                 buffer_size: int = 10_000, max_connections: int = 16,
                 transport: httpx.AsyncBaseTransport | None = None,
                 fallback: Callable[[BoundQuery, int | None], BoundLadder] | None = None) -> None:
        """``fallback(query, max_tokens)``: the ladder when the service fails (default: the per-class
        q-quantile of the completions this client recorded, flagged ``fallback``)."""
        self.max_batch = max_batch
        self.max_connections = max_connections
        self.fallback_ladder = fallback
        self.quantile = quantile
        self.fallback = FallbackBounds(quantile)
        self.buffer: deque[dict[str, Any]] = deque()
        self.buffer_size = buffer_size
        self.dropped = 0  # completion records dropped because the buffer was full
        self.fallbacks = 0  # ladders answered by the client's fallback
        self._pending: set[asyncio.Future[list[BoundLadder]]] = set()  # calls that outlived their caller
        self._http = httpx.AsyncClient(
            base_url=base_url, timeout=httpx.Timeout(timeout_s), transport=transport,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections))

    async def __aenter__(self) -> EstimatorClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- estimates -------------------------------------------------------------------------------
    async def ladders_within(self, queries: Sequence[BoundQuery], max_tokens: Sequence[int | None] | None,
                             timeout_s: float) -> list[BoundLadder]:
        """``ladders``, or the fallback when they take longer than ``timeout_s`` in all.

        The call itself is not cancelled (``asyncio.shield``): it ends under the client's own per-phase
        timeouts and gives its connection back. Cancelling httpx requests in flight (``wait_for`` on the
        call) leaked connection-pool slots until every call failed with ``PoolTimeout``: after one slow
        spell of the estimator, serving fell back for good (found by ``tempo chaos``)."""
        if len(self._pending) >= self.max_connections:  # the pool is taken by calls still finishing: shed
            self.fallbacks += len(queries)
            return [self._fallback(q, max_tokens[i] if max_tokens else None) for i, q in enumerate(queries)]
        call = asyncio.ensure_future(self.ladders(queries, max_tokens))
        self._pending.add(call)
        call.add_done_callback(self._pending.discard)
        try:
            return await asyncio.wait_for(asyncio.shield(call), timeout_s)
        except TimeoutError:
            self.fallbacks += len(queries)
            return [self._fallback(q, max_tokens[i] if max_tokens else None) for i, q in enumerate(queries)]

    def _fallback(self, query: BoundQuery, max_tokens: int | None) -> BoundLadder:
        if self.fallback_ladder is not None:
            return self.fallback_ladder(query, max_tokens)
        return BoundLadder.fixed(self.fallback.bound(query.slo_class.value), self.quantile, fallback=True)

    async def ladders(self, queries: Sequence[BoundQuery], max_tokens: Sequence[int | None] | None = None
                      ) -> list[BoundLadder]:
        """One ladder per query, batched ``max_batch`` at a time (chunks in parallel); fallback on failure."""
        chunks = [list(range(i, min(i + self.max_batch, len(queries)))) for i in range(0, len(queries), self.max_batch)]
        results = await asyncio.gather(*(self._chunk([queries[i] for i in c],
                                                     [max_tokens[i] for i in c] if max_tokens else None)
                                         for c in chunks))
        return [ladder for chunk in results for ladder in chunk]

    async def _chunk(self, queries: list[BoundQuery], max_tokens: list[int | None] | None) -> list[BoundLadder]:
        body = {"requests": [_payload(q, max_tokens[i] if max_tokens else None) for i, q in enumerate(queries)]}
        try:
            response = await self._http.post("/v1/estimate:batch", json=body)
            response.raise_for_status()
            estimates = response.json()["estimates"]
            return [BoundLadder(tuple((int(k), int(b)) for k, b in e["ladder"]), float(e["quantile"]),
                                bool(e["fallback"])) for e in estimates]
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            self.fallbacks += len(queries)
            return [self._fallback(q, max_tokens[i] if max_tokens else None) for i, q in enumerate(queries)]

    # -- completions -----------------------------------------------------------------------------
    async def record_completion(self, record: dict[str, Any]) -> bool:
        """Send a completion record (buffered and retried later when the service or Redis is down).

        Returns True when this record and everything buffered before it were accepted."""
        self.fallback.observe(str(record.get("slo_class", "latency")), int(record.get("output_tokens", 1)))
        self.buffer.append(record)
        while len(self.buffer) > self.buffer_size:
            self.buffer.popleft()
            self.dropped += 1
        return await self.flush()

    async def flush(self) -> bool:
        """Send buffered records in order; stops at the first failure (they stay buffered)."""
        while self.buffer:
            try:
                response = await self._http.post("/v1/completions", json=self.buffer[0])
            except httpx.HTTPError:
                return False
            if response.status_code >= 500:
                return False
            self.buffer.popleft()  # 2xx, or 4xx: a bad record is not retried forever
        return True


def _payload(query: BoundQuery, max_tokens: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {"prompt_tokens": query.prompt_tokens, "slo_class": query.slo_class.value,
                           "app": query.app or None, "model": query.model}
    if query.prompt is not None:
        out["prompt"] = query.prompt
    if max_tokens is not None:
        out["max_tokens"] = max_tokens
    return {k: v for k, v in out.items() if v is not None}
