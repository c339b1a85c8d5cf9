"""The estimator REST API against a real Redis: estimates, completions, registry, auth, metrics, bad input,
and a Redis outage (a dedicated redis-server stopped and started again)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from tempo.estimator.app import create_app
from tempo.estimator.castillo_stream import DEFAULT_MODEL, completion_records, small_artifact
from tempo.estimator.retrain import publish
from tempo.estimator.settings import Settings
from tempo.estimator.store import Store

from tests.conftest import RedisServer

ADMIN = {"Authorization": "Bearer s3cret"}
MBPP = {"prompt": "Write a python function to find the maximum of three numbers.", "prompt_tokens": 20,
        "slo_class": "deadline", "app": "Mbpp", "model": DEFAULT_MODEL}


def settings_for(url: str, tmp_path: Path, **extra: object) -> Settings:
    return Settings(redis_url=url, artifacts_dir=tmp_path / "artifacts", admin_token="s3cret",  # type: ignore[arg-type]
                    registry_poll_s=0.1, worker_block_ms=50, checkpoint_interval_s=0.1, **extra)


def wait_for(condition, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def artifact() -> Path:
    return small_artifact()


@pytest.fixture()
def published(redis_client: redis.Redis, redis_url: str, tmp_path: Path, artifact: Path) -> tuple[Settings, str]:
    settings = settings_for(redis_url, tmp_path)
    version = publish(Store(redis_url), artifact, settings.artifacts_dir)
    return settings, version


@pytest.fixture()
def client(published: tuple[Settings, str]) -> Iterator[TestClient]:
    with TestClient(create_app(published[0])) as c:
        yield c


def test_estimate_serves_the_active_model(client: TestClient, published: tuple[Settings, str]) -> None:
    body = client.post("/v1/estimate", json=MBPP).json()
    assert body["model_version"] == published[1] and body["fallback"] is False and body["source"] == "batch"
    ladder = body["ladder"]
    assert ladder[0] == [0, body["upper_bound"]]
    assert all(b > k for k, b in ladder) and all(b1 >= b0 for (_, b0), (_, b1) in itertools.pairwise(ladder))


def test_max_tokens_caps_the_ladder(client: TestClient) -> None:
    body = client.post("/v1/estimate", json={**MBPP, "max_tokens": 50}).json()
    assert body["upper_bound"] <= 50 and all(b <= 50 for _, b in body["ladder"])


def test_batch_and_refine(client: TestClient) -> None:
    batch = client.post("/v1/estimate:batch", json={"requests": [MBPP, {"prompt_tokens": 5, "slo_class": "latency"}]})
    assert batch.status_code == 200 and len(batch.json()["estimates"]) == 2
    ladder = batch.json()["estimates"][0]["ladder"]
    refined = client.post("/v1/refine", json={"request": MBPP, "generated": ladder[-1][0] + 1, "ladder": ladder}).json()
    assert refined["upper_bound"] > ladder[-1][0] + 1 and refined["remaining"] >= 1


@pytest.mark.parametrize("body", [
    {}, {"slo_class": "latency"}, {"prompt_tokens": -1, "slo_class": "latency"},
    {"prompt_tokens": 1, "slo_class": "urgent"}, {"prompt_tokens": 1, "slo_class": "latency", "extra": 1},
    {"prompt": "x" * 200_001, "slo_class": "latency"}, {"prompt_tokens": 1, "slo_class": "latency", "quantile": 0.5},
    {"prompt_tokens": 1, "slo_class": "latency", "quantile": 1.5},
])
def test_bad_estimate_input_is_a_clear_4xx(client: TestClient, body: dict[str, object]) -> None:
    response = client.post("/v1/estimate", json=body)
    assert response.status_code == 422 and "detail" in response.json()


def test_lone_surrogates_and_oversized_batches_are_refused(client: TestClient) -> None:
    raw = '{"prompt": "\\ud800", "slo_class": "latency"}'
    response = client.post("/v1/estimate", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 422
    too_many = {"requests": [{"prompt_tokens": 1, "slo_class": "latency"}] * 1025}
    assert client.post("/v1/estimate:batch", json=too_many).status_code == 422
    huge = b'{"prompt": "' + b"a" * (9 << 20) + b'", "slo_class": "latency"}'
    assert client.post("/v1/estimate", content=huge, headers={"content-type": "application/json"}).status_code == 413


def test_admin_endpoints_need_the_token(client: TestClient, published: tuple[Settings, str]) -> None:
    version = published[1]
    assert client.post(f"/v1/models/{version}:activate").status_code == 401
    assert client.post(f"/v1/models/{version}:activate", headers={"Authorization": "Bearer no"}).status_code == 403
    assert client.post("/v1/models:retrain", headers={"Authorization": "Basic abc"}).status_code == 401
    ok = client.post(f"/v1/models/{version}:activate", headers=ADMIN)
    assert ok.status_code == 200 and ok.json()["active"] == version
    assert client.post("/v1/models/0123456789abcdef:activate", headers=ADMIN).status_code == 404


def test_tampered_artifact_is_not_activated(client: TestClient, published: tuple[Settings, str],
                                            redis_url: str) -> None:
    settings, version = published
    store = Store(redis_url)
    store.register_version("fake0000", {"digest": "0" * 64})
    (settings.artifacts_dir / "fake0000").mkdir()
    response = client.post("/v1/models/fake0000:activate", headers=ADMIN)
    assert response.status_code == 409 and "cannot be served" in response.json()["detail"]
    assert store.active_version() == version


def test_completions_are_recorded_once_learned_and_measured(client: TestClient, redis_client: redis.Redis) -> None:
    records = list(completion_records(DEFAULT_MODEL, n=60, seed=3))
    for record in records:
        response = client.post("/v1/completions", json={**record, "bound": 600})
        assert response.status_code == 202, response.text
    again = client.post("/v1/completions", json={**records[0], "bound": 600})
    assert again.status_code == 200 and again.json()["duplicate"] is True
    assert redis_client.xlen("tempo:completions") == 60
    stored = redis_client.xrange("tempo:completions", count=1)[0][1][b"data"]
    assert b'"sketch"' in stored and b'"prompt"' not in stored  # text is not stored unless configured
    wait_for(lambda: client.get("/healthz").json()["online_updates"] == 60)
    metrics = client.get("/metrics").text
    assert "tempo_estimator_online_updates_total 60.0" in metrics
    assert f'tempo_estimator_coverage{{model="{DEFAULT_MODEL}",slo_class="deadline"}}' in metrics
    assert 'tempo_estimator_requests_total{endpoint="/v1/completions",status="202"}' in metrics
    assert "tempo_estimator_model_info{version=" in metrics


def test_models_lists_versions_and_rollback(client: TestClient, published: tuple[Settings, str],
                                            redis_url: str, tmp_path: Path) -> None:
    body = client.get("/v1/models").json()
    assert body["active"] == published[1] == body["serving"]
    assert [v["version"] for v in body["versions"]] == [published[1]]


def test_without_a_model_the_fallback_is_flagged(redis_client: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    with TestClient(create_app(settings_for(redis_url, tmp_path))) as c:
        body = c.post("/v1/estimate", json={"prompt_tokens": 3, "slo_class": "latency"}).json()
    assert body["fallback"] is True and body["source"] == "fallback" and body["model_version"] is None


def test_redis_outage_estimates_from_memory_and_worker_resumes(tmp_path: Path, artifact: Path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    try:
        settings = settings_for(server.url, tmp_path)
        version = publish(Store(server.url), artifact, settings.artifacts_dir)
        with TestClient(create_app(settings)) as c:
            records = list(completion_records(DEFAULT_MODEL, n=40, seed=5))
            for r in records[:20]:
                assert c.post("/v1/completions", json=r).status_code == 202
            wait_for(lambda: c.get("/healthz").json()["online_updates"] == 20)
            server.stop()
            body = c.post("/v1/estimate", json=MBPP)
            assert body.status_code == 200 and body.json()["model_version"] == version  # the last model, in memory
            lost = c.post("/v1/completions", json=records[20])
            assert lost.status_code == 503 and "Redis" in lost.json()["detail"]
            assert c.get("/healthz").json()["status"] == "degraded"
            server.start()  # empty (no persistence): the worker must re-create its group by itself
            for r in records[20:]:
                assert c.post("/v1/completions", json=r).status_code == 202
            wait_for(lambda: c.get("/healthz").json()["online_updates"] == 40, timeout=20)
            assert c.get("/healthz").json()["status"] == "ok"
            assert "tempo_estimator_redis_up 1.0" in c.get("/metrics").text
    finally:
        server.stop()


def test_retrain_endpoint_runs_a_job_and_reports_it(client: TestClient) -> None:
    assert client.post("/v1/models:retrain", headers=ADMIN, json={"min_samples": 10_000}).status_code == 202
    wait_for(lambda: (client.get("/v1/models").json().get("last_retrain") or {}).get("status") == "skipped")
    assert client.post("/v1/models:retrain", headers=ADMIN, json={"since": "abc"}).status_code == 422
