"""``tempo chaos`` on the real stack (its own Redis, the estimator service, tempo serve on the tiny model),
a short matrix: every completion recorded exactly once, no 5xx from a failing dependency, every fault
recovered, the learner exactly once. Needs ``make vllm``; the full matrix is docs/reliability.md's command."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console
from tempo.serving.chaos.run import ChaosConfig, run_chaos, verdict

pytestmark = pytest.mark.vllm


def test_a_short_fault_matrix_loses_nothing_and_recovers(tmp_path: Path) -> None:
    pytest.importorskip("vllm")
    faults = ["estimator-killed", "redis-restart", "worker-killed", "serve-restart"]
    report = run_chaos(ChaosConfig(faults, hold_s=4.0, settle_s=2.0, rps=3.0, recovery_timeout_s=120.0,
                                   out=tmp_path), Console(width=120))
    assert verdict(report) == [], report
    rows = {row["fault"]: row for row in report["rows"]}
    assert all(rows[f]["sent"] > 0 and rows[f]["expected"] > 0 for f in faults)
    assert rows["worker-killed"]["notes"]["uncommitted_at_kill"] > 0  # the kill did land mid-batch
    assert rows["serve-restart"]["refused"] + rows["serve-restart"]["aborted"] > 0  # clients saw the restart
    assert report["total"]["recorded"] == report["total"]["expected"]
