"""The API server's collector pauses: timed without taking a metric's lock, and the start-up heap frozen."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from tempo.serving.bench.engine_client import parse_metrics
from tempo.serving.chaos.soak import gc_pauses


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


def test_the_soak_reads_pauses_per_generation_from_a_scrape() -> None:
    registry = CollectorRegistry()
    histogram = Histogram("tempo_gc_pause_seconds", "h", ["generation"], registry=registry,
                          buckets=(1e-3, 0.01, 0.1, 0.25, 0.5, 1.0))
    for generation, seconds in (("0", 0.0005), ("2", 0.3), ("2", 0.7), ("2", 0.05)):
        histogram.labels(generation).observe(seconds)
    scrape = parse_metrics(generate_latest(registry).decode())
    assert gc_pauses(scrape) == {
        "0": {"collections": 1.0, "seconds": 0.001, "over_100ms": 0.0, "over_500ms": 0.0},
        "2": {"collections": 3.0, "seconds": 1.05, "over_100ms": 2.0, "over_500ms": 1.0}}
    assert gc_pauses({}) == {}
