"""Crash test of the online worker against a real Redis: a worker process is SIGKILLed mid-batch, a new
one restarts from the committed state and the pending entries; the result equals an uncrashed run (every
completion applied exactly once in effect, none lost)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from tempo.estimator.castillo_stream import DEFAULT_MODEL, completion_records
from tempo.estimator.engine import Estimator
from tempo.estimator.settings import Settings
from tempo.estimator.store import ONLINE_GROUP, Store
from tempo.estimator.worker import OnlineWorker

N = 400


def _state_applied(store: Store) -> int:
    state = store.load_online_state()
    return int(state["learner"]["n_applied"]) if state else 0


@pytest.mark.parametrize("restart_as", ["online-1", "online-2"])  # same consumer (own pending) / another (claim)
def test_killed_worker_loses_nothing_and_applies_each_record_once(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path, restart_as: str
) -> None:
    store = Store(redis_url)
    records = list(completion_records(DEFAULT_MODEL, n=N, seed=11, with_prompt=False))
    for r in records:
        assert store.append_completion(r) is not None
    env = {**os.environ, "TEMPO_APPLY_DELAY_S": "0.004", "TEMPO_CHECKPOINT_EVERY": "100", "TEMPO_WORKER_BATCH": "64",
           "TEMPO_CHECKPOINT_INTERVAL_S": "1000", "TEMPO_CONSUMER": "online-1"}
    proc = subprocess.Popen([sys.executable, "-m", "tempo.cli", "estimator", "worker", "--redis-url", redis_url,
                             "--artifacts", str(tmp_path / "artifacts")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while _state_applied(store) < 100:  # first commit done ...
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "worker made no progress"
            time.sleep(0.02)
        time.sleep(0.15)  # ... and some records applied but not committed: mid-batch
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    committed = _state_applied(store)
    pending = store.pending_count(ONLINE_GROUP)
    assert 100 <= committed < N and pending > 0  # killed with delivered, unacknowledged records

    settings = Settings(redis_url=redis_url, consumer=restart_as, claim_idle_ms=0, worker_block_ms=10)
    estimator = Estimator(0.9)
    worker = OnlineWorker(store, estimator, settings)
    deadline = time.monotonic() + 30
    while estimator.learner.n_applied_ < N or worker.uncommitted:
        worker.run_once()
        worker.commit()
        assert time.monotonic() < deadline
    assert estimator.learner.n_applied_ == N  # none lost, none applied twice
    assert store.pending_count(ONLINE_GROUP) == 0 and _state_applied(store) == N

    reference = Estimator(0.9)
    reference.apply(records)  # the same records, in order, with no crash
    assert estimator.learner.to_dict() == reference.learner.to_dict()


def test_redelivered_records_are_skipped(redis_client: redis.Redis, redis_url: str) -> None:
    store = Store(redis_url)
    for r in completion_records(DEFAULT_MODEL, n=20, seed=2, with_prompt=False):
        store.append_completion(r)
    settings = Settings(redis_url=redis_url, worker_block_ms=10)
    estimator = Estimator(0.9)
    worker = OnlineWorker(store, estimator, settings)
    worker.run_once()
    worker.commit()
    entries = store.range()
    worker._apply(entries)  # a duplicate delivery (e.g. a claim racing a commit)
    assert estimator.learner.n_applied_ == 20 and worker.skipped == 20


def test_malformed_stream_entries_are_acknowledged_not_applied(redis_client: redis.Redis, redis_url: str) -> None:
    store = Store(redis_url)
    redis_client.xadd("tempo:completions", {"data": b"not json"})
    redis_client.xadd("tempo:completions", {"other": b"1"})
    store.append_completion(next(completion_records(DEFAULT_MODEL, n=1, with_prompt=False)))
    worker = OnlineWorker(store, Estimator(0.9), Settings(redis_url=redis_url, worker_block_ms=10))
    worker.run_once()
    worker.commit()
    assert worker.dropped == 2 and worker.estimator.learner.n_applied_ == 1
    assert store.pending_count(ONLINE_GROUP) == 0


def test_records_with_bad_fields_are_skipped_not_retried_forever(redis_client: redis.Redis, redis_url: str) -> None:
    good = next(completion_records(DEFAULT_MODEL, n=1, with_prompt=False))
    bad = [{**good, "sketch": {"idx": "!!notbase64", "w": "", "n_chars": 1, "n_words": 1, "n_newlines": 0}},
           {**good, "prompt_tokens": "many"}, {**good, "app": 7}, {**good, "prompt": 5, "sketch": None},
           {**good, "sketch": {"indices": [1 << 20], "weights": [1.0], "n_chars": 1, "n_words": 1, "n_newlines": 0}}]
    for record in [*bad, good]:
        redis_client.xadd("tempo:completions", {"data": json.dumps(record)})
    store = Store(redis_url)
    worker = OnlineWorker(store, Estimator(0.9), Settings(redis_url=redis_url, worker_block_ms=10))
    worker.run_once()
    worker.commit()
    assert worker.estimator.learner.n_applied_ == 1 and worker.dropped == len(bad)
    assert store.pending_count(ONLINE_GROUP) == 0


def test_stream_records_are_compact(redis_client: redis.Redis, redis_url: str) -> None:
    from tempo.models.features import FeatureSpec, PromptSketch, pack_sketch, unpack_sketch

    spec = FeatureSpec()
    sketch = PromptSketch.of("def add(a, b):\n    return a + b  # a small prompt " * 20, spec)
    packed = pack_sketch(sketch, spec)
    assert len(json.dumps(packed)) < len(json.dumps(sketch.to_dict())) / 2
    back = unpack_sketch(json.loads(json.dumps(packed)), spec)
    assert (back.indices == sketch.indices).all() and abs(back.weights - sketch.weights).max() < 1e-3


def test_censored_lengths_are_not_learned_from() -> None:
    from tempo.estimator.engine import Estimator

    estimator = Estimator(0.9)
    base = {"request_id": "r", "slo_class": "deadline", "prompt_tokens": 10, "output_tokens": 7, "prompt": "x"}
    assert estimator.parse(base) is not None and estimator.parse({**base, "finish_reason": "length"}) is not None
    for reason in ("rejected", "abort", "error"):
        assert estimator.parse({**base, "finish_reason": reason}) is None
