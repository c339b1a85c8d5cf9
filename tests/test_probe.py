"""The soak's idle probe: its summary counts refusals and their waits from the JSON-lines log."""

from __future__ import annotations

import json
from pathlib import Path

from tempo.serving.chaos.probe import summary


def test_summary_counts_refusals_their_waits_and_the_slow_ones(tmp_path: Path) -> None:
    rows = [{"t_s": 0.0, "status": 200, "reason": None, "ms": 40.0},
            *({"t_s": i / 10, "status": 503, "reason": "queue-full", "ms": float(i)} for i in range(1, 100)),
            {"t_s": 11.0, "status": 503, "reason": "queue-full", "ms": 250.0, "cpu_wait_ms": 10.0},
            {"t_s": 11.5, "status": 503, "reason": "queue-full", "ms": 130.0, "cpu_wait_ms": 40.0},
            {"t_s": 12.0, "status": None, "reason": "ConnectError", "ms": 1.0}]
    log = tmp_path / "probe.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    got = summary(log)
    assert (got["sent"], got["admitted"], got["refused"], got["errors"]) == (103, 1, 101, 1)
    assert got["reasons"] == ["queue-full"] and got["over_100ms"] == 2 and got["wait_ms_max"] == 250.0
    assert got["over_100ms_less_own_cpu_wait"] == 1  # 130 ms, 40 of them the probe waiting for a core
    assert got["wait_ms_p50"] == 51.0 and 99 < got["wait_ms_p99"] < 250


def test_summary_of_a_missing_log_is_empty(tmp_path: Path) -> None:
    got = summary(tmp_path / "absent.jsonl")
    assert got["sent"] == 0 and got["wait_ms_p99"] is None and got["over_100ms"] == 0


def test_a_thread_reads_its_own_wait_for_a_core() -> None:
    import sys

    from tempo.serving.vllm.loop_lag import run_queue_wait_s

    first = run_queue_wait_s()
    if sys.platform != "linux":
        assert first is None
        return
    assert first is not None and first >= 0
    sum(range(2_000_000))
    second = run_queue_wait_s()
    assert second is not None and second >= first
