"""Drift on real CASTILLO lengths (smaller than the reported run, see ``tempo.estimator.experiments``):
the adaptive calibration brings coverage back without retraining, and a retrain from the Redis completions
publishes a model that is better on the new data; the River model carries an unseen served model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis
from tempo.estimator.castillo_stream import DEFAULT_MODEL, small_artifact
from tempo.estimator.experiments import drift, unseen
from tempo.estimator.retrain import publish
from tempo.estimator.settings import Settings
from tempo.estimator.store import Store


def test_drift_recovers_online_and_retrain_publishes_a_better_model(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    settings = Settings(redis_url=redis_url, artifacts_dir=tmp_path / "artifacts")
    store = Store(redis_url, timeout_s=5.0)
    old = publish(store, small_artifact(DEFAULT_MODEL), settings.artifacts_dir)
    result = drift(n_before=400, n_after=1200, window=200, store=store, settings=settings)
    print(result)
    adaptive, static = result["adaptive"], result["static"]
    assert static["coverage_last_two_thirds"] < 0.86  # the drift is real: the batch model alone under-covers
    assert adaptive["completions_to_recover"] is not None and adaptive["completions_to_recover"] <= 600
    assert abs(adaptive["coverage_last_two_thirds"] - 0.9) <= 0.03
    report = result["retrain"]
    assert report["status"] == "activated", report
    candidate, active = report["candidate_metrics"], report["active_metrics"]
    assert abs(candidate["coverage"] - 0.9) < abs(active["coverage"] - 0.9)  # better on the new data
    assert store.active_version() == report["candidate"] != old
    assert store.history()[0] == old  # kept for rollback
    assert store.rollback() == old


def test_retrain_rejects_a_worse_candidate_and_skips_small_windows(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    from tempo.estimator.retrain import accept, retrain

    settings = Settings(redis_url=redis_url, artifacts_dir=tmp_path / "artifacts")
    store = Store(redis_url)
    assert retrain(store, settings, min_samples=100).status == "skipped"
    assert accept({"coverage": 0.85, "overestimation": 1.0}, None, 0.9, 0.02) is not None
    assert accept({"coverage": 0.9, "overestimation": 2.0}, {"coverage": 0.9, "overestimation": 1.5}, 0.9, 0.02)
    assert accept({"coverage": 0.9, "overestimation": 2.0}, {"coverage": 0.8, "overestimation": 1.5}, 0.9, 0.02) is None
    assert accept({"coverage": 0.78, "overestimation": 2.0}, {"coverage": 0.8, "overestimation": 1.5}, 0.9, 0.02)
    assert accept({"coverage": 0.9, "overestimation": 1.4}, {"coverage": 0.9, "overestimation": 1.5}, 0.9, 0.02) is None


def test_river_model_carries_an_unseen_served_model() -> None:
    result = unseen(n=1200, warmup=300)
    print(result)
    assert result["batch_only"]["coverage"] < 0.87  # the batch model has never seen this served model
    for name in ("batch+calibration", "river+calibration"):
        assert abs(result[name]["coverage"] - 0.9) <= 0.03, (name, result)


def test_publish_gate_refuses_a_worse_model_and_the_served_one_stays(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An artifact trained elsewhere passes the retraining job's gate on recent completions: a model at the
    wrong quantile is refused (exit 1, not registered), an equal one is published, ``--no-gate`` skips it."""
    from tempo.estimator.castillo_stream import completion_records
    from tempo.models.artifact import verify_artifact

    from tempo.cli import main

    settings = Settings(redis_url=redis_url, artifacts_dir=tmp_path / "artifacts")
    store = Store(redis_url)
    served = publish(store, small_artifact(DEFAULT_MODEL), settings.artifacts_dir)
    args = ["--redis-url", redis_url, "--artifacts", str(settings.artifacts_dir)]
    worse = small_artifact(DEFAULT_MODEL, quantile=0.3)
    assert main(["estimator", "publish", str(worse), *args]) == 0  # no completions yet: nothing to judge by
    assert "not judged" in json.loads(capsys.readouterr().out)["reason"]
    assert store.rollback() == served
    for record in completion_records(DEFAULT_MODEL, n=800, with_prompt=False, prefix="gate"):
        store.append_completion(record)
    assert main(["estimator", "publish", str(worse), *args]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["status"] == "rejected" and "below" in report["reason"], report
    assert report["candidate_metrics"]["coverage"] < 0.6 < report["active_metrics"]["coverage"]
    assert store.active_version() == served
    assert main(["estimator", "publish", str(small_artifact(DEFAULT_MODEL)), *args]) == 0  # the same model again
    assert json.loads(capsys.readouterr().out)["status"] == "activated" and store.active_version() == served
    assert main(["estimator", "publish", str(worse), "--no-gate", *args]) == 0  # an operator's explicit choice
    verify_artifact(settings.artifacts_dir / capsys.readouterr().out.strip())
