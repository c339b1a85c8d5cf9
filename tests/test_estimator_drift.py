"""Drift on real CASTILLO lengths (smaller than the reported run, see ``tempo.estimator.experiments``):
the adaptive calibration brings coverage back without retraining, and a retrain from the Redis completions
publishes a model that is better on the new data; the River model carries an unseen served model."""

from __future__ import annotations

from pathlib import Path

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
