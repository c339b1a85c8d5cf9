"""The demo's own accounting (the run itself needs the engine: ``make demo``)."""

from __future__ import annotations

from tempo.demo import phase_seconds


def test_phase_seconds_split_the_whole_run_between_its_phases() -> None:
    marks = [("Redis", 10.0), ("serve", 10.5), ("run", 80.0)]
    phases = phase_seconds(marks, ended=200.04)
    assert phases == [("Redis", 0.5), ("serve", 69.5), ("run", 120.0)]
    assert sum(s for _, s in phases) == 190.0
