"""The API server's pauses: collections timed without a metric's lock, the start-up heap frozen, the loop's lag."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from tempo.serving.bench.engine_client import parse_metrics
from tempo.serving.chaos.soak import pauses


def test_install_freezes_the_heap_once_and_times_every_collection() -> None:
    script = textwrap.dedent("""
        import gc
        from prometheus_client import CollectorRegistry, Histogram
        from tempo.serving.vllm import gc_pauses
        assert gc.get_freeze_count() == 0
        gc_pauses.install()
        frozen = gc.get_freeze_count()
        assert frozen > 1000, frozen  # the modules imported so far
        gc_pauses.install()  # once per process
        assert gc.get_freeze_count() == frozen
        gc.collect()
        assert gc_pauses.pending()
        histogram = Histogram("p", "p", ["generation"], registry=CollectorRegistry())
        gc_pauses.drain(histogram)
        assert not gc_pauses.pending()
        assert histogram.labels("2")._sum.get() > 0
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_the_soak_reads_collections_and_loop_lag_from_a_scrape() -> None:
    registry = CollectorRegistry()
    histogram = Histogram("tempo_gc_pause_seconds", "h", ["generation"], registry=registry,
                          buckets=(1e-3, 0.01, 0.025, 0.1, 0.25, 0.5, 1.0))
    for generation, seconds in (("0", 0.0005), ("2", 0.3), ("2", 0.7), ("2", 0.05)):
        histogram.labels(generation).observe(seconds)
    scrape = parse_metrics(generate_latest(registry).decode())
    lag = Histogram("tempo_event_loop_lag_seconds", "h", registry=registry, buckets=(0.025, 0.1, 0.5))
    for seconds in (0.001, 0.03, 0.2):
        lag.observe(seconds)
    scrape = parse_metrics(generate_latest(registry).decode())
    assert pauses(scrape, "tempo_gc_pause_seconds", "generation") == {
        "0": {"count": 1.0, "seconds": 0.001, "over_25ms": 0.0, "over_100ms": 0.0, "over_500ms": 0.0},
        "2": {"count": 3.0, "seconds": 1.05, "over_25ms": 3.0, "over_100ms": 2.0, "over_500ms": 1.0}}
    assert pauses(scrape, "tempo_event_loop_lag_seconds") == {
        "all": {"count": 3.0, "seconds": 0.231, "over_25ms": 2.0, "over_100ms": 1.0, "over_500ms": 0.0}}
    assert pauses({}, "tempo_gc_pause_seconds", "generation") == {}


def test_the_loop_watcher_times_a_blocked_loop() -> None:
    import asyncio
    import time

    from tempo.serving.vllm import loop_lag

    histogram = Histogram("lag", "h", registry=CollectorRegistry(), buckets=(0.025, 0.1, 0.5))
    longest = Gauge("lag_max", "g", registry=CollectorRegistry())

    async def block_once() -> None:
        task = loop_lag.start(histogram, longest, interval_s=0.01)
        await asyncio.sleep(0.05)
        time.sleep(0.15)  # the loop stands still, as in a long collection
        await asyncio.sleep(0.05)
        task.cancel()

    asyncio.run(block_once())
    buckets = {s.labels["le"]: s.value for s in next(iter(histogram.collect())).samples if s.name == "lag_bucket"}
    assert buckets["+Inf"] >= 4 and buckets["+Inf"] - buckets["0.1"] == 1  # one wake-up late by >= 0.1 s
    assert 0.1 < longest._value.get() < 0.5
