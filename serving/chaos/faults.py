"""The fault matrix: each fault is injected into the running stack, held, then healed.

``inject`` and ``heal`` act on the stack's real processes (SIGKILL, SIGTERM, restart on the same port),
on Redis itself (``CONFIG SET maxmemory``), on the estimator's wire (the fault proxy) or on the model
registry (a worse model and a tampered artifact through the same paths a retraining job uses). Each
returns notes for the report (what was refused and why). ``signals`` name what must hold again before
the fault counts as recovered (``run.recovered``).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tempo.errors import TempoError


@dataclass
class ChaosStack:
    """The running parts the faults act on."""

    redis: Any  # stack.LocalRedis(persist=True)
    estimator: Any  # stack.EstimatorService
    proxy: Any  # proxy.FaultProxy in front of the estimator
    server: Any  # launch.ManagedServer: tempo serve, --estimator-url = the proxy
    store: Any  # estimator.store.Store on the same Redis
    admin_token: str
    work: Path  # scratch space (artifacts built by the faults)
    active_version: str | None = None  # the model the estimator must keep serving
    notes: dict[str, Any] = field(default_factory=dict)

    def redis_client(self) -> Any:
        import redis

        return redis.Redis.from_url(self.redis.url, socket_timeout=5)

    def estimator_version(self) -> str | None:
        try:
            return httpx.get(f"{self.estimator.url}/healthz", timeout=2).json().get("model_version")
        except (httpx.HTTPError, ValueError):
            return None


Action = Callable[[ChaosStack], dict[str, Any]]


@dataclass(frozen=True)
class Fault:
    name: str
    what: str
    inject: Action
    heal: Action
    signals: tuple[str, ...]  # serving, estimator, records, learner, model


def _nothing(stack: ChaosStack) -> dict[str, Any]:
    return {}


# -- the estimator ---------------------------------------------------------------------------------
def _kill_estimator(stack: ChaosStack) -> dict[str, Any]:
    stack.estimator.kill()
    return {}


def _start_estimator(stack: ChaosStack) -> dict[str, Any]:
    started = time.monotonic()
    stack.estimator.start()
    return {"estimator_restart_s": round(time.monotonic() - started, 2)}


def _proxy(mode: str, delay_s: float = 0.0) -> Action:
    def act(stack: ChaosStack) -> dict[str, Any]:
        stack.proxy.set(mode, delay_s)
        return {}

    return act


# -- Redis -----------------------------------------------------------------------------------------
def _stop_redis(stack: ChaosStack) -> dict[str, Any]:
    stack.redis.stop()
    return {}


def _start_redis(stack: ChaosStack) -> dict[str, Any]:
    stack.redis.start()
    return {}


def _fill_redis(stack: ChaosStack) -> dict[str, Any]:
    client = stack.redis_client()
    used = int(client.info("memory")["used_memory"])
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", str(used + 64 * 1024))  # a few records' worth, then writes are refused
    refused = 0
    try:
        for i in range(10_000):
            client.set(f"tempo:chaos:ballast:{i}", "x" * 1024)
    except Exception as exc:  # the OOM answer we are waiting for
        refused = 1
        kind = type(exc).__name__
    client.close()
    return {"maxmemory_bytes": used + 64 * 1024, "writes_refused": bool(refused),
            "refusal": kind if refused else None}


def _unfill_redis(stack: ChaosStack) -> dict[str, Any]:
    client = stack.redis_client()
    client.config_set("maxmemory", "0")
    ballast = list(client.scan_iter("tempo:chaos:ballast:*", count=1000))
    if ballast:
        client.delete(*ballast)  # only the keys this fault wrote
    client.close()
    return {}


# -- the online worker -----------------------------------------------------------------------------
def _slow_learner(stack: ChaosStack) -> dict[str, Any]:
    """Restart the estimator with a learner that applies records slowly and commits rarely, so that at the
    kill it holds a batch applied but not committed (the at-least-once window)."""
    stack.estimator.kill()
    stack.estimator.start({"TEMPO_APPLY_DELAY_S": "0.05", "TEMPO_CHECKPOINT_INTERVAL_S": "600",
                           "TEMPO_CHECKPOINT_EVERY": "100000"})
    return {}


def _kill_mid_batch(stack: ChaosStack) -> dict[str, Any]:
    from tempo.estimator.store import ONLINE_GROUP

    pending = stack.store.pending_count(ONLINE_GROUP)
    stack.estimator.kill()
    started = time.monotonic()
    stack.estimator.start()
    return {"uncommitted_at_kill": pending, "estimator_restart_s": round(time.monotonic() - started, 2)}


# -- the model registry ----------------------------------------------------------------------------
def _publish_worse(stack: ChaosStack) -> dict[str, Any]:
    """A retraining job run with a wrong quantile (0.3 instead of the served one, and no calibration)
    publishes its model through the gate: it must be refused, and the served model must not change."""
    from tempo.estimator.retrain import publish_gated, samples_from_records
    from tempo.estimator.settings import Settings
    from tempo.models.artifact import save_artifact
    from tempo.models.features import FeatureSpec
    from tempo.models.length_bounds import LengthBoundModel

    records = [r for _, r in stack.store.recent(20_000) if r is not None]
    parts = samples_from_records(records, FeatureSpec())
    sizes = {s: len(parts[s]) for s in ("fit", "calibration", "holdout")}
    if min(sizes.values()) < 20:
        with_sketch = sum(1 for r in records if isinstance(r.get("sketch"), dict))
        raise TempoError(f"too few completions with prompt sketches for the retraining fault ({len(records)} "
                         f"records, {with_sketch} with a sketch, slices {sizes}); raise --rps or run it later")
    worse = LengthBoundModel(quantile=0.3, model_params={"n_estimators": 20}).fit(parts["fit"])  # uncalibrated
    directory = stack.work / "worse-model"
    shutil.rmtree(directory, ignore_errors=True)
    save_artifact(worse, directory, data_summary={"chaos": "quantile 0.3"})
    settings = Settings(redis_url=stack.redis.url, artifacts_dir=stack.estimator.artifacts)  # type: ignore[arg-type]
    report = publish_gated(stack.store, settings, directory)
    return {"publish": report.status, "reason": report.reason,
            "candidate_coverage": report.candidate_metrics.get("coverage"),
            "active_coverage": report.active_metrics.get("coverage"),
            "refused": report.status == "rejected"}


def _tamper(stack: ChaosStack) -> dict[str, Any]:
    """A corrupt artifact: one byte of a published version's model file flipped. Activation through the
    API must be refused (409), and a registry pointer moved to it behind the API's back must not be
    loaded by the service's watcher."""
    from tempo.estimator.castillo_stream import small_artifact
    from tempo.estimator.retrain import publish

    version = publish(stack.store, small_artifact(), stack.estimator.artifacts, activate=False)
    target = stack.estimator.artifacts / version
    victim = max((p for p in target.iterdir() if p.name != "manifest.json"), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    response = httpx.post(f"{stack.estimator.url}/v1/models/{version}:activate",
                          headers={"Authorization": f"Bearer {stack.admin_token}"}, timeout=30)
    unauthorized = httpx.post(f"{stack.estimator.url}/v1/models/{version}:activate", timeout=30)
    previous = stack.store.activate(version)  # behind the API's back: the watcher must refuse to load it
    time.sleep(3.0)  # a few watcher polls
    return {"activate_status": response.status_code, "activate_answer": response.json().get("detail"),
            "without_token_status": unauthorized.status_code, "tampered_version": version,
            "served_after_pointer_moved": stack.estimator_version(), "restore": previous,
            "refused": response.status_code == 409 and stack.estimator_version() == previous}


def _restore_registry(stack: ChaosStack) -> dict[str, Any]:
    if stack.active_version is not None and stack.store.active_version() != stack.active_version:
        stack.store.activate(stack.active_version)
    return {}


# -- tempo serve -----------------------------------------------------------------------------------
def _stop_server(stack: ChaosStack) -> dict[str, Any]:
    stack.server.stop()
    return {}


def _start_server(stack: ChaosStack) -> dict[str, Any]:
    started = time.monotonic()
    stack.server.start()
    return {"serve_restart_s": round(time.monotonic() - started, 1)}


FAULTS: dict[str, Fault] = {f.name: f for f in (
    Fault("baseline", "no fault (the reference window)", _nothing, _nothing, ("serving", "records")),
    Fault("estimator-killed", "SIGKILL the estimator service; restart it after the hold",
          _kill_estimator, _start_estimator, ("serving", "estimator", "records")),
    Fault("estimator-slow", "every estimator answer delayed 500 ms (the front end's timeout is shorter)",
          _proxy("slow", 0.5), _proxy("pass"), ("serving", "estimator", "records")),
    Fault("estimator-malformed", "the estimator answers 200 with a body that is not JSON",
          _proxy("malformed"), _proxy("pass"), ("serving", "estimator", "records")),
    Fault("estimator-absurd", "the estimator answers with impossible bounds (negative, zero, 1e15)",
          _proxy("absurd"), _proxy("pass"), ("serving", "estimator", "records")),
    Fault("redis-restart", "Redis stopped (SIGTERM) for the hold, then started again on its port",
          _stop_redis, _start_redis, ("serving", "records", "learner")),
    Fault("redis-maxmemory", "Redis at maxmemory with noeviction: every write refused (OOM) for the hold",
          _fill_redis, _unfill_redis, ("serving", "records", "learner")),
    Fault("worker-killed", "the online learner SIGKILLed with a batch applied and not committed",
          _slow_learner, _kill_mid_batch, ("serving", "records", "learner", "model")),
    Fault("retrain-worse", "a retraining job publishes a worse model (quantile 0.3) through the gate",
          _publish_worse, _restore_registry, ("serving", "model")),
    Fault("artifact-corrupt", "a published artifact with a flipped byte: activated via the API and behind it",
          _tamper, _restore_registry, ("serving", "model", "estimator")),
    Fault("serve-restart", "tempo serve stopped (SIGTERM) with requests in flight, then started again",
          _stop_server, _start_server, ("serving", "records", "estimator")),
)}
