"""Schema-based fuzzing (schemathesis) of the running service's OpenAPI spec: no input gives a 5xx."""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
import schemathesis
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation import GenerationMode
from tempo.estimator.app import create_app
from tempo.estimator.castillo_stream import small_artifact
from tempo.estimator.retrain import publish
from tempo.estimator.settings import Settings
from tempo.estimator.store import Store

from tests.conftest import flush_if_ours, free_port

ADMIN = {"Authorization": "Bearer s3cret"}
EXAMPLES = 30



@pytest.fixture(scope="module")
def server_url(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    flush_if_ours(redis.Redis.from_url(redis_url))
    artifacts = tmp_path_factory.mktemp("fuzz") / "artifacts"
    publish(Store(redis_url), small_artifact(), Path(artifacts))
    app = create_app(Settings(redis_url=redis_url, artifacts_dir=artifacts, admin_token="s3cret"))  # type: ignore[arg-type]
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "service did not start"
        time.sleep(0.1)
    yield url
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def api_schema(server_url: str) -> schemathesis.schemas.BaseSchema:
    return schemathesis.openapi.from_url(f"{server_url}/openapi.json")


def test_no_server_errors(api_schema: schemathesis.schemas.BaseSchema) -> None:
    """Every operation, ``EXAMPLES`` generated cases each (positive and negative data), with the admin
    token so that admin endpoints are exercised past authentication."""
    failures: list[str] = []
    calls = 0
    operations = [result.ok() for result in api_schema.get_all_operations()]
    for operation, mode in itertools.product(operations, list(GenerationMode)):

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case: schemathesis.Case) -> None:
            nonlocal calls
            calls += 1
            response = case.call(headers=ADMIN, timeout=30)
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path} {case.body!r:.200}: {response.status_code}")

        with contextlib.suppress(Unsatisfiable):  # no invalid input exists (e.g. GET /healthz, negative mode)
            run()
    print(f"fuzz: {len(operations)} operations, {calls} calls, {len(failures)} server errors")
    assert calls > 200
    assert not failures, failures[:5]
