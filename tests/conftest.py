"""Shared fixtures. Redis is real: a redis-server started on a free loopback port for the session,
unless TEMPO_REDIS_URL points at one to reuse."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis

REQUIRE_VLLM = "TEMPO_REQUIRE_VLLM"  # CI sets it: a real-engine test that cannot run fails instead of skipping


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get(REQUIRE_VLLM) == "1" and item.get_closest_marker("vllm") is not None:
        report.outcome = "failed"
        report.longrepr = f"{item.nodeid}: a real-engine test was skipped while {REQUIRE_VLLM}=1: {report.longrepr}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve_asgi(app: Any) -> Iterator[str]:
    """``app`` behind a real HTTP server on a loopback port, in a thread; yields its URL. Clients that
    stream need a real socket (httpx's ASGI transport does not stream; aiohttp has no ASGI transport)."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "the stand-in server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(5)


class RedisServer:
    """A real redis-server process on a loopback port; stop() and start() simulate an outage."""

    def __init__(self, workdir: Path) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            pytest.fail("redis-server is not installed (.ci/run installs it from Debian's packages)")
        self.executable = executable
        self.workdir = workdir
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [self.executable, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.workdir)]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


SENTINEL = "tempo:tests:claimed"  # marks a database the test session claimed (empty when claimed)


def claim_empty_database(url: str) -> str:
    """A URL of ``url``'s server on a database the tests may flush: an empty one (db 15 down to 1), marked as
    claimed. The tests never flush a database they did not claim (it may be the user's)."""
    prefix = url.rsplit("/", 1)[0] if url.count("/") > 2 else url.rstrip("/")
    for index in range(15, 0, -1):
        candidate = f"{prefix}/{index}"
        client = redis.Redis.from_url(candidate)
        try:
            if client.dbsize() == 0 and client.set(SENTINEL, str(os.getpid()), nx=True):
                return candidate
        except redis.ResponseError:  # fewer databases configured
            continue
        finally:
            client.close()
    pytest.fail(f"TEMPO_REDIS_URL={url}: no empty database (1-15) to claim; the tests flush the database they "
                "use, so they never use one that holds data")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a real Redis server for the whole session: our own on a free port, or an empty database
    claimed on the server TEMPO_REDIS_URL names."""
    configured = os.environ.get("TEMPO_REDIS_URL")
    if configured:
        url = claim_empty_database(configured)
        yield url
        client = redis.Redis.from_url(url)
        if client.exists(SENTINEL):
            client.flushdb()  # ours: claimed empty, so everything in it is the tests'
        client.close()
        return
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


def flush_if_ours(client: redis.Redis, own_server: bool | None = None) -> None:
    """Flush a database the tests own (their own server, or a claimed one: the claim is kept); else fail."""
    if own_server is None:
        own_server = not os.environ.get("TEMPO_REDIS_URL")
    if own_server or client.exists(SENTINEL):
        client.flushdb()
        if not own_server:
            client.set(SENTINEL, str(os.getpid()))
    else:
        pytest.fail("refusing to flush a Redis database the tests did not claim")


@pytest.fixture()
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A client on a flushed database (one the tests own: their own server, or a claimed empty database)."""
    own = not os.environ.get("TEMPO_REDIS_URL")
    client = redis.Redis.from_url(redis_url)
    flush_if_ours(client, own)
    yield client
    flush_if_ours(client, own)
    client.close()
