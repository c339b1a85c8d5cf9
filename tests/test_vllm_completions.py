"""Completion records from the engine to a real Redis: exactly once, through an outage and a restart."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tempo.estimator.store import Store
from tempo.serving.vllm.completions import CompletionWriter

from tests.conftest import RedisServer


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test's own, so it can be stopped and started."""
    redis_server = RedisServer(tmp_path)
    redis_server.start()
    yield redis_server
    redis_server.stop()


def record(i: int) -> dict[str, object]:
    return {"request_id": f"req-{i}", "slo_class": "latency", "prompt_tokens": 5, "output_tokens": 3,
            "finish_reason": "stop", "sketch": '{"n_chars": 4}', "prompt": "secret"}


def ids_in_stream(store: Store) -> list[str]:
    import json

    return [json.loads(fields[b"data"])["request_id"] for _, fields in store.redis.xrange(store.stream)]


def wait_for(condition: object, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_each_record_is_written_once_without_its_prompt(server: RedisServer, tmp_path: Path) -> None:
    store = Store(server.url)
    seen: list[str] = []
    writer = CompletionWriter(store, spill_path=tmp_path / "spill.jsonl", on_record=lambda r: seen.append(
        str(r["request_id"])))
    for i in range(50):
        writer.put(record(i))
    writer.put(record(7))  # the same request id again: not a second record
    assert writer.flush(10)
    writer.stop()
    assert ids_in_stream(store) == [f"req-{i}" for i in range(50)]
    import json

    first = json.loads(store.redis.xrange(store.stream, count=1)[0][1][b"data"])
    assert "prompt" not in first and first["sketch"] == {"n_chars": 4}
    assert writer.counters()["written"] == 50 and writer.duplicates == 1 and len(seen) == 51


def test_an_outage_loses_nothing_and_duplicates_nothing(server: RedisServer, tmp_path: Path) -> None:
    store = Store(server.url, timeout_s=0.2)
    writer = CompletionWriter(store, spill_path=tmp_path / "spill.jsonl")
    for i in range(20):
        writer.put(record(i))
    assert writer.flush(10)
    server.stop()
    for i in range(20, 60):
        writer.put(record(i))
    time.sleep(0.5)
    assert writer.counters()["queued"] > 0 and writer.failures > 0
    server.start()  # an empty Redis came back (no persistence): only what was queued is written now
    wait_for(lambda: writer.counters()["queued"] == 0)
    writer.stop()
    assert ids_in_stream(store) == [f"req-{i}" for i in range(20, 60)]
    assert writer.written == 60 and writer.dropped == 0


def test_records_left_at_shutdown_are_spilled_and_replayed(server: RedisServer, tmp_path: Path) -> None:
    spill = tmp_path / "spill.jsonl"
    store = Store(server.url, timeout_s=0.2)
    server.stop()
    writer = CompletionWriter(store, spill_path=spill)
    for i in range(5):
        writer.put(record(i))
    writer.stop(timeout_s=0.5)
    assert writer.spilled == 5 and spill.is_file()
    server.start()
    again = CompletionWriter(Store(server.url), spill_path=spill)
    assert again.flush(10)
    again.stop()
    assert ids_in_stream(store) == [f"req-{i}" for i in range(5)]
    assert not spill.exists() and not list(tmp_path.glob("spill.jsonl.*"))


def test_a_full_buffer_drops_the_oldest_and_counts_them(server: RedisServer, tmp_path: Path) -> None:
    store = Store(server.url, timeout_s=0.2)
    server.stop()
    writer = CompletionWriter(store, buffer_limit=10, spill_path=None)
    for i in range(30):
        writer.put(record(i))
    wait_for(lambda: writer.dropped >= 20)
    server.start()
    wait_for(lambda: writer.counters()["queued"] == 0)
    writer.stop()
    assert len(ids_in_stream(store)) == 10 and writer.dropped == 20
