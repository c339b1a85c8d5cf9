"""Load generator for the estimator: keep-alive HTTP/1.1 over asyncio streams (light on CPU, so the
generator does not starve the service on a small machine), closed loop (``concurrency``) or open loop
(``rate`` requests/s spread over the connections). Reports req/s, estimates/s and latency percentiles.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from tempo.errors import TempoError


@dataclass
class LoadResult:
    mode: str
    concurrency: int
    duration_s: float
    requests: int
    errors: int
    estimates: int
    req_per_s: float
    estimates_per_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    rate: float | None = None
    distinct: bool = False  # every prompt new (no cache hit in the service)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def sample_payloads(n: int = 200, seed: int = 0) -> list[dict[str, Any]]:
    """Estimate requests from real CASTILLO prompts (falls back to synthetic ones without the data)."""
    try:
        from tempo.estimator.castillo_stream import DEFAULT_MODEL, completion_records

        records = list(completion_records(DEFAULT_MODEL, n=n, seed=seed))
        return [{"prompt": r["prompt"][:4000], "prompt_tokens": r["prompt_tokens"], "slo_class": r["slo_class"],
                 "app": r["app"], "model": r["model"]} for r in records]
    except TempoError:
        rng = random.Random(seed)
        return [{"prompt_tokens": rng.randint(10, 2000), "slo_class": "latency"} for _ in range(n)]


class _Connection:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        self.writer.write(head + body)
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("connection closed")
        status = int(status_line.split()[1])
        length = 0
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value.strip())
        await self.reader.readexactly(length)
        return status

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


async def _run(url: str, concurrency: int, duration_s: float, batch: int, rate: float | None,
               payloads: list[dict[str, Any]], distinct: bool = False) -> LoadResult:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = "/v1/estimate:batch" if batch > 1 else "/v1/estimate"
    rng = random.Random(0)
    bodies = []
    for _ in range(64):
        if batch > 1:
            bodies.append(json.dumps({"requests": [rng.choice(payloads) for _ in range(batch)]}).encode())
        else:
            bodies.append(json.dumps(rng.choice(payloads)).encode())
    latencies: list[float] = []
    errors = 0
    counter = 0

    def body_for(i: int) -> bytes:
        """A pre-encoded body, or with ``distinct`` one whose prompts were never seen (no cache hit)."""
        nonlocal counter
        if not distinct:
            return bodies[i % len(bodies)]
        chosen = [payloads[(i * 31 + j) % len(payloads)] for j in range(batch)]
        unique = []
        for p in chosen:
            counter += 1
            unique.append({**p, "prompt": f"{p.get('prompt', '')} [{counter}]"})
        return json.dumps({"requests": unique} if batch > 1 else unique[0]).encode()

    start = time.perf_counter()
    end = start + duration_s
    interval = concurrency / rate if rate else 0.0

    async def worker(index: int) -> None:
        nonlocal errors
        conn = _Connection(host, port)
        next_send = start + (interval * index / concurrency if rate else 0.0)
        i = index
        try:
            while True:
                if rate:
                    delay = next_send - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    next_send += interval
                t0 = time.perf_counter()  # open loop: latency from the scheduled send, not from when we got to it
                if t0 >= end:
                    return
                try:
                    status = await conn.post(path, body_for(i))
                    if status != 200:
                        errors += 1
                except (OSError, ConnectionError, asyncio.IncompleteReadError, ValueError, IndexError):
                    errors += 1
                    conn.close()
                latencies.append(time.perf_counter() - t0)
                i += concurrency
        finally:
            conn.close()

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - start
    lat = np.asarray(latencies) * 1000 if latencies else np.zeros(1)
    n = len(latencies)
    return LoadResult("batch" if batch > 1 else "single", concurrency, round(elapsed, 3), n, errors,
                      (n - errors) * batch, round(n / elapsed, 1), round((n - errors) * batch / elapsed, 1),
                      round(float(np.percentile(lat, 50)), 3), round(float(np.percentile(lat, 99)), 3),
                      round(float(lat.max()), 3), rate)


def run_load(url: str, concurrency: int = 8, duration_s: float = 10.0, batch: int = 1, rate: float | None = None,
             payloads: list[dict[str, Any]] | None = None, distinct: bool = False) -> LoadResult:
    if concurrency < 1 or duration_s <= 0 or batch < 1 or (rate is not None and rate <= 0):
        raise TempoError("--concurrency, --duration, --batch and --rate must be positive")
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise TempoError(f"--url must be an http:// URL, got {url!r}")
    result = asyncio.run(_run(url, concurrency, duration_s, batch, rate, payloads or sample_payloads(), distinct))
    result.distinct = distinct
    return result
