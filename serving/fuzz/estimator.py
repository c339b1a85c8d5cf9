"""Fuzz the estimator service (``tempo.estimator.app``): in-process under uvicorn in a thread, on a Redis of
its own (nothing of the user's is touched) with a small published artifact, the admin token sent with
every call so that the admin endpoints are exercised past authentication."""

from __future__ import annotations

import contextlib
import copy
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tempo.serving.fuzz.core import FuzzTarget, run_fuzz

from tempo.errors import TempoError

ADMIN_TOKEN = "fuzz-admin"


@contextlib.contextmanager
def estimator_server(redis_url: str, artifacts: Path, admin_token: str = ADMIN_TOKEN) -> Iterator[str]:
    """The estimator service on a free loopback port (uvicorn in a daemon thread); yields its URL."""
    import httpx
    import uvicorn
    from tempo.estimator.app import create_app
    from tempo.estimator.settings import Settings
    from tempo.serving.vllm.launch import free_port

    app = create_app(Settings(redis_url=redis_url, artifacts_dir=artifacts, admin_token=admin_token))  # type: ignore[arg-type]
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical",
                                           access_log=False))
    thread = threading.Thread(target=server.run, name="tempo-fuzz-estimator", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    try:
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            if not thread.is_alive() or time.monotonic() > deadline:
                raise TempoError("the estimator service did not start")
            time.sleep(0.1)
        yield url
    finally:
        server.should_exit = True
        thread.join(15)


def patch_schema(raw: dict[str, Any], quantile: float) -> dict[str, Any]:
    """A copy of the service's OpenAPI schema with what its validators check and the schema cannot say (so that
    positive cases are mostly valid): an estimate names a prompt or a token count, and a quantile, when it names
    one, is the served one."""
    raw = copy.deepcopy(raw)
    for name, body in raw.get("components", {}).get("schemas", {}).items():
        properties = body.get("properties") if isinstance(body, dict) else None
        if not isinstance(properties, dict):
            continue
        if name == "EstimateRequest" and {"prompt", "prompt_tokens"} <= set(properties):
            body["anyOf"] = [{"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
                             {"required": ["prompt_tokens"], "properties": {"prompt_tokens": {"type": "integer"}}}]
        if "quantile" in properties and "quantile" not in body.get("required", []):
            properties["quantile"] = {"anyOf": [{"enum": [quantile]}, {"type": "null"}]}
    return raw


def estimator_target(url: str, admin_token: str = ADMIN_TOKEN, quantile: float = 0.9) -> FuzzTarget:
    import httpx
    import schemathesis

    raw = httpx.get(f"{url}/openapi.json", timeout=30).json()
    schema = schemathesis.openapi.from_dict(patch_schema(raw, quantile))
    return FuzzTarget("estimator", schema, url, headers={"Authorization": f"Bearer {admin_token}"}, timeout_s=30)


def fuzz_estimator_at(redis_url: str, artifacts: Path, requests: int, seed: int = 0,
                      progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Publish a small artifact into ``redis_url`` (a database the caller owns), serve, fuzz; the report."""
    from tempo.estimator.castillo_stream import small_artifact
    from tempo.estimator.retrain import publish
    from tempo.estimator.store import Store

    store = Store(redis_url)
    try:
        publish(store, small_artifact(), artifacts)
    finally:
        store.close()
    with estimator_server(redis_url, artifacts) as url:
        return run_fuzz(estimator_target(url), requests, seed, progress)


def fuzz_estimator(requests: int, seed: int = 0, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Fuzz the estimator service on a Redis started here (a redis-server, or the embedded one), stopped after."""
    from tempo.serving.vllm.stack import LocalRedis

    redis_server = LocalRedis()
    try:
        with tempfile.TemporaryDirectory(prefix="tempo-fuzz-") as scratch:
            return fuzz_estimator_at(redis_server.url, Path(scratch) / "artifacts", requests, seed, progress)
    finally:
        redis_server.close()
