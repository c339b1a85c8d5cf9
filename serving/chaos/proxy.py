"""A fault-injecting reverse proxy in front of the estimator service: ``tempo serve`` is pointed at it, and
the chaos run switches its mode to make the estimator slow or make it answer nonsense without touching the
service itself.

Modes: ``pass`` (forward), ``slow`` (forward after ``delay_s``), ``malformed`` (200 with a body that is not
JSON), ``absurd`` (the real answer with every number replaced by an impossible one: negative, zero or 1e15
bounds, a ladder that shrinks). A closed upstream answers 502, as a real proxy would.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from tempo.serving.vllm.launch import free_port, stop_group, wait_healthy

from tempo.errors import TempoError

MODES = ("pass", "slow", "malformed", "absurd")
ABSURD = (-7, 0, 10**15)


def absurd(value: Any, i: list[int]) -> Any:
    """``value`` with every number swapped for one of ``ABSURD`` in turn (strings and keys kept)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        i[0] += 1
        return ABSURD[i[0] % len(ABSURD)]
    if isinstance(value, list):
        return [absurd(v, i) for v in value]
    if isinstance(value, dict):
        return {k: absurd(v, i) for k, v in value.items()}
    return value


class ProxyApp:
    """The proxy itself (an ASGI app, run by ``main`` in a process of its own: a proxy sharing a process,
    and so a GIL, with the load generator would add its own delays). ``POST /_chaos/mode`` with
    ``{"mode": ..., "delay_s": ...}`` switches it; ``GET /_chaos/counts`` says how many answers of each kind
    it gave."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.mode, self.delay_s = "pass", 0.0
        self.counts: dict[str, int] = dict.fromkeys(MODES, 0)
        self._http: httpx.AsyncClient | None = None
        self.app = Starlette(routes=[Route("/_chaos/mode", self._set, methods=["POST"]),
                                     Route("/_chaos/counts", self._counts, methods=["GET"]),
                                     Route("/{path:path}", self._handle, methods=["GET", "POST"])])

    async def _set(self, request: Request) -> Response:
        data = await request.json()
        if data.get("mode") not in MODES:
            return Response(f"mode must be one of {', '.join(MODES)}".encode(), status_code=400)
        self.mode, self.delay_s = data["mode"], float(data.get("delay_s", 0.0))
        return Response(b"{}", media_type="application/json")

    async def _counts(self, request: Request) -> Response:
        return Response(json.dumps(self.counts).encode(), media_type="application/json")

    async def _handle(self, request: Request) -> Response:
        mode = self.mode
        self.counts[mode] += 1
        try:
            content = await request.body()
        except ClientDisconnect:  # the caller gave up (its timeout is shorter than the delay)
            return Response(status_code=499)
        if mode == "malformed":
            return Response(b'{"upper_bound": 12, "ladder": [[0, 3', media_type="application/json")
        if mode == "slow":
            await asyncio.sleep(self.delay_s)
        if self._http is None:
            self._http = httpx.AsyncClient(base_url=self.upstream, timeout=30)
        try:
            upstream = await self._http.request(request.method, request.url.path, params=request.query_params,
                                                content=content,
                                                headers={"content-type": request.headers.get("content-type",
                                                                                             "application/json")})
        except httpx.HTTPError as exc:
            return Response(f"upstream unavailable: {type(exc).__name__}".encode(), status_code=502)
        body = upstream.content
        if mode == "absurd" and upstream.headers.get("content-type", "").startswith("application/json"):
            body = json.dumps(absurd(upstream.json(), [0])).encode()
        return Response(body, status_code=upstream.status_code,
                        media_type=upstream.headers.get("content-type"))


class FaultProxy:
    """``proxy.url`` forwards to ``upstream`` from a child process; ``proxy.set(mode, delay_s)`` switches it."""

    def __init__(self, upstream: str, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        with log.open("wb") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "tempo.serving.chaos.proxy", upstream,
                                             str(self.port)], stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        if not wait_healthy(self.process, f"{self.url}/_chaos/counts", "the fault proxy", log, 30):
            self.close()
            raise TempoError(f"the fault proxy did not start; see {log}")

    def set(self, mode: str, delay_s: float = 0.0) -> None:
        if mode not in MODES:
            raise TempoError(f"proxy mode must be one of {', '.join(MODES)}, got {mode!r}")
        httpx.post(f"{self.url}/_chaos/mode", json={"mode": mode, "delay_s": delay_s}, timeout=10).raise_for_status()

    @property
    def counts(self) -> dict[str, int]:
        return dict(httpx.get(f"{self.url}/_chaos/counts", timeout=10).json())

    def close(self) -> None:
        stop_group(self.process, 10)


def main() -> None:
    import uvicorn

    upstream, port = sys.argv[1], int(sys.argv[2])
    uvicorn.run(ProxyApp(upstream).app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
