"""``tempo soak`` for two minutes at 2x the calibrated saturation on the real stack: refusals carry their
reason, memory is sampled throughout, the report and the plot are written. The hour-long soak
and the 10-minute 4x overload are docs/reliability.md's commands. Needs ``make vllm``."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console
from tempo.serving.chaos.soak import SoakConfig, plot, run_soak

pytestmark = pytest.mark.vllm


def test_two_minutes_past_saturation_refuses_at_once_and_keeps_memory_bounded(tmp_path: Path) -> None:
    pytest.importorskip("vllm")
    report = run_soak(SoakConfig(duration_s=120.0, load=2.0, interval_s=10.0, max_in_flight=16, out=tmp_path),
                      Console(width=120))
    assert report["server"] == {"exited_during_load": False}
    requests = report["requests"]
    assert requests["sent"] > 50 and requests["answered"] > 0 and requests["errors"] == 0
    if requests["refused"]:  # how long clients waited for them is a figure (docs/reliability.md), not a test
        assert set(report["refusals"]["reasons"]) <= {"queue-full", "job-dropped"}
        assert report["refusals"]["wait_ms_p50"] is not None
    probe = report["refusals"]["probe"]  # the idle client in its own process
    assert probe["sent"] > 100 and probe["errors"] == 0 and set(probe["reasons"]) <= {"queue-full"}
    assert len(report["samples"]) >= 10 and "total" not in report["samples"][0]["serve_rss_by_process"]
    memory = report["memory"]
    assert 0 < memory["serve_rss_mb"]["max"] < 2 * memory["serve_rss_mb"]["first"] + 500
    assert report["intervals"] and report["admitted"]["token_goodput"] > 0
    plot(report, tmp_path / "soak.png")
    assert (tmp_path / "soak.png").stat().st_size > 10_000
