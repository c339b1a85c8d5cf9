"""A stand-in for the estimator service over real HTTP whose behaviour a test switches: answering, slow,
garbage, absurd ladders (to show that serving never depends on it); job outlooks are answered in mode ok."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

LADDER = [[0, 33], [10, 40]]
# POST /v1/jobs:estimate (a compound call's job outlook, asked by the engine)
JOB_OUTLOOK = {"stages_after": 2, "decode_tokens_after": 300, "prefill_tokens_after": 500, "tokens_after": 1600.0,
               "decode_total_after": 600.0, "prefill_total_after": 1000.0, "median": {}, "sub_deadline_fraction": 0.4,
               "stage_deadline_s": None, "matched_jobs": 12.0, "fallback": False, "quantile": 0.9}


class _Handler(BaseHTTPRequestHandler):
    server: StubEstimator  # type: ignore[assignment]

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])) or b"{}")
        mode = self.server.mode
        if self.path == "/v1/jobs:estimate" and mode == "ok":
            self.server.job_queries.append(body)
            self._answer(json.dumps(JOB_OUTLOOK).encode())
            return
        self.server.calls += 1
        if mode == "slow":
            time.sleep(3.0)
        n = len(body.get("requests", [body]))
        estimate = {"upper_bound": LADDER[0][1], "quantile": 0.9, "ladder": LADDER, "model_version": "stub",
                    "fallback": False, "source": "batch"}
        if mode == "absurd":
            estimate = {**estimate, "ladder": [[5, 1]]}
        self._answer(b"not json" if mode == "garbage" else json.dumps({"estimates": [estimate] * n}).encode())

    def _answer(self, data: bytes) -> None:
        try:
            self.send_response(200)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up waiting: what the slow mode is for

    def log_message(self, *args: Any) -> None:
        pass


class StubEstimator(ThreadingHTTPServer):
    daemon_threads = True
    modes: ClassVar[tuple[str, ...]] = ("ok", "slow", "garbage", "absurd")

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.mode = "ok"
        self.calls = 0  # ladder requests
        self.job_queries: list[dict[str, Any]] = []  # bodies of the job outlooks asked (answered in mode ok)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def close(self) -> None:
        self.shutdown()
        self.server_close()
