"""Start and stop ``tempo serve`` as a child process (benchmarks, the demo, tests): wait until it answers
``/health``, stop the whole process group (the API server and its engine core) at the end."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import httpx

from tempo.errors import TempoError


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_healthy(process: subprocess.Popen[bytes], url: str, what: str, log: Path, timeout_s: float) -> bool:
    """Poll ``url`` until it answers 200 (True) or ``timeout_s`` passes (False); TempoError if the process exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise TempoError(f"{what} exited with {process.returncode}; see {log}:\n"
                             + log.read_text(errors="replace")[-2000:])
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    return False


def stop_group(process: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    """SIGTERM the process group, SIGKILL it after ``timeout_s``."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


class ManagedServer:
    """``with ManagedServer([...tempo serve options...], log) as server: server.url``."""

    def __init__(self, args: list[str], log: Path, port: int | None = None, startup_s: float = 300.0,
                 env: dict[str, str] | None = None) -> None:
        self.args, self.log, self.port = args, log, port or free_port()
        self.startup_s = startup_s
        self.env = env or {}
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ManagedServer:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "tempo.cli", "serve", "--port", str(self.port), *self.args]
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                            env={**os.environ, **self.env}, start_new_session=True)
        if wait_healthy(self.process, f"{self.url}/health", "tempo serve", self.log, self.startup_s):
            return self
        self.stop()
        raise TempoError(f"tempo serve did not answer within {self.startup_s:.0f} s; see {self.log}")

    def stop(self) -> None:
        if self.process is not None:
            stop_group(self.process)

    def __enter__(self) -> ManagedServer:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
