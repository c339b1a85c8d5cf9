"""An idle client's view of refusals: one small request at a time from a process of its own.

The load generator times refusals in its own event loop, which also streams every admitted request and
shares the cores with the engine: its p99 says as much about itself as about the server. The probe has
nothing else to do. Every ``interval`` it sends a one-token best-effort completion over a kept-alive
connection and appends ``{"t_s", "status", "reason", "ms", "cpu_wait_ms"}`` to a JSON-lines file until
SIGTERM (``cpu_wait_ms``: of ``ms``, the probe's own wait for a core, where Linux says).

``python -m tempo.serving.chaos.probe URL MODEL OUT [INTERVAL_S]`` (``tempo soak`` starts it).
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tempo.serving.vllm.loop_lag import run_queue_wait_s


def probe(url: str, model: str, out: Path, interval_s: float, stop: threading.Event) -> None:
    import httpx

    body = {"model": model, "prompt": "ping", "max_tokens": 1, "vllm_xargs": {"slo_class": "best_effort"}}
    start = time.monotonic()
    with httpx.Client(base_url=url, timeout=30.0) as client, out.open("a", encoding="utf-8") as log:
        while not stop.is_set():
            sent, waited = time.perf_counter(), run_queue_wait_s()
            row: dict[str, Any] = {"t_s": round(time.monotonic() - start, 3)}
            try:
                response = client.post("/v1/completions", json=body)
                row.update(status=response.status_code,
                           reason=response.headers.get("x-tempo-request-dropped-reason"))
            except httpx.HTTPError as exc:
                row.update(status=None, reason=type(exc).__name__)
            row["ms"] = round(1000 * (time.perf_counter() - sent), 2)
            now_waited = run_queue_wait_s()
            if waited is not None and now_waited is not None:  # of it, the probe's own wait for a core
                row["cpu_wait_ms"] = round(1000 * (now_waited - waited), 2)
            log.write(json.dumps(row) + "\n")
            log.flush()
            stop.wait(max(0.0, interval_s - (time.perf_counter() - sent)))


def summary(path: Path) -> dict[str, Any]:
    """Requests sent, refused (503), the refusals' wait p50 / p99 / max (ms) and how many took over 100 ms."""
    import numpy as np

    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()] \
        if path.is_file() else []
    waits = [r["ms"] for r in rows if r["status"] == 503]
    quantile = (lambda q: round(float(np.quantile(waits, q)), 1)) if waits else (lambda q: None)
    return {"sent": len(rows), "refused": len(waits), "admitted": sum(1 for r in rows if r["status"] == 200),
            "errors": sum(1 for r in rows if r["status"] not in (200, 503)),
            "reasons": sorted({r["reason"] for r in rows if r["status"] == 503 and r["reason"]}),
            "wait_ms_p50": quantile(0.5), "wait_ms_p99": quantile(0.99), "wait_ms_max": max(waits, default=None),
            "over_100ms": sum(1 for w in waits if w > 100),
            # the same less the probe's own wait for a core (the client shares the cores with the server)
            "over_100ms_less_own_cpu_wait": sum(1 for r in rows if r["status"] == 503
                                                and r["ms"] - r.get("cpu_wait_ms", 0.0) > 100)}


def main(argv: list[str]) -> None:
    url, model, out = argv[0], argv[1], Path(argv[2])
    interval_s = float(argv[3]) if len(argv) > 3 else 0.2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    probe(url, model, out, interval_s, stop)


if __name__ == "__main__":
    main(sys.argv[1:])
