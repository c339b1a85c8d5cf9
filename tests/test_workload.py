"""Workload builder, file format and readers, on the vendored real data."""

from __future__ import annotations

import gzip
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from tempo.data.castillo import DEGENERATE_LENGTH, load_length_rows
from tempo.scheduler.slo import SLOClass
from tempo.serving.workloads.builder import ClassMix, WorkloadSpec, build_workload
from tempo.serving.workloads.format import WorkloadRequest, read_workload, write_workload
from tempo.serving.workloads.sources import (
    azure_conv_trace_path,
    load_arrival_trace,
    load_workflows,
    poisson_arrivals,
    trace_arrivals,
)
from tempo.serving.workloads.stats import stage_structure_errors, summarize

from tempo.errors import TempoError


@pytest.fixture(scope="module")
def length_rows():
    return load_length_rows()


def test_mix_parsing() -> None:
    assert ClassMix.parse("1:1:1").shares()[SLOClass.BEST_EFFORT] == 0
    assert ClassMix.parse("2:1:1:0").shares()[SLOClass.LATENCY] == 0.5
    assert ClassMix.parse("latency=1, best_effort=3").shares()[SLOClass.BEST_EFFORT] == 0.75
    for bad, message in [("0:0:0", "sum to 0"), ("1:1", "L:D:C"), ("a:b:c", "could not convert"),
                         ("chat=1", "unknown SLO class"), ("1:-1:1", ">= 0")]:
        with pytest.raises(TempoError, match=message):
            ClassMix.parse(bad)


@pytest.mark.parametrize("total", [0, 1, 7, 100, 3001])
def test_mix_counts_are_exact(total: int) -> None:
    counts = ClassMix.parse("1:1:1:0.5").counts(total)
    assert sum(counts.values()) == total
    for cls, share in ClassMix.parse("1:1:1:0.5").shares().items():
        assert abs(counts[cls] - share * total) < 1


def test_trace_arrivals_hit_the_target_rate_and_keep_bursts() -> None:
    trace = load_arrival_trace(azure_conv_trace_path())
    assert len(trace) == 19_366 and trace[0] == 0
    rng = np.random.default_rng(1)
    times = trace_arrivals(trace, rate=4.0, duration_s=300.0, rng=rng)
    assert len(times) == 1200 and times[0] == 0 and times[-1] < 300
    assert np.all(np.diff(times) >= 0)
    gaps = np.diff(times)
    assert gaps.std() / gaps.mean() > 1.0  # bursty like the trace, unlike Poisson (CV 1)


def test_poisson_arrivals_rate() -> None:
    times = poisson_arrivals(10.0, 600.0, np.random.default_rng(0))
    assert abs(len(times) / 600.0 - 10.0) < 0.5
    gaps = np.diff(times)
    assert 0.9 < gaps.std() / gaps.mean() < 1.1


def test_trace_reader_accepts_numeric_timestamps_and_rejects_malformed_rows(tmp_path: Path) -> None:
    good = tmp_path / "t.csv"
    good.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n10.5,1,1\n12.0,2,2\n11.0,3,3\n")
    assert load_arrival_trace(good).tolist() == [0.0, 0.5, 1.5]
    header = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
    cases = {
        header + "2023-11-16 18:15:46.68,1,1\nyesterday,1,1\n": ":3: malformed trace row",
        header + "1.0,1,1\n2.0,1\n": ":3: malformed trace row",
        "time,tokens\n1,2\n": "expected a TIMESTAMP column",
        header + "1.0,1,1\n": "at least two rows",
    }
    for text, message in cases.items():
        bad = tmp_path / "bad.csv"
        bad.write_text(text)
        with pytest.raises(TempoError, match=message):
            load_arrival_trace(bad)
    with pytest.raises(TempoError, match="not found"):
        load_arrival_trace(tmp_path / "missing.csv")


def test_castillo_reader_drops_degenerate_samples(tmp_path: Path, length_rows) -> None:
    assert all(0 < s < DEGENERATE_LENGTH for row in length_rows for s in row.samples)
    assert len({row.model for row in length_rows}) == 10
    bad = tmp_path / "l.csv.gz"
    with gzip.open(bad, "wt") as handle:
        handle.write("dataset,model,prompt_id,input_tokens," + ",".join(f"out{i}" for i in range(10)) + "\n")
        handle.write("A,m,p,12," + ",".join(["5"] * 9 + ["many"]) + "\n")
    with pytest.raises(TempoError, match=":2: malformed row"):
        load_length_rows(bad)


def test_build_is_seeded_and_reproducible(tmp_path: Path, length_rows) -> None:
    spec = WorkloadSpec(rps=2.0, duration_s=60.0, mix=ClassMix.parse("1:1:1:1"), seed=3)
    a = build_workload(spec, length_rows=length_rows)
    b = build_workload(spec, length_rows=length_rows)
    c = build_workload(WorkloadSpec(rps=2.0, duration_s=60.0, seed=4), length_rows=length_rows)
    assert a == b and a != c
    path = tmp_path / "w.jsonl"
    assert write_workload(path, a) == len(a)
    assert read_workload(path) == a


def test_built_workload_uses_real_lengths_with_noise(length_rows) -> None:
    spec = WorkloadSpec(rps=20.0, duration_s=120.0, mix=ClassMix.parse("1:1:0:0"), seed=5)
    requests = build_workload(spec, length_rows=length_rows)
    samples = {(r.dataset, r.prompt_id): r for r in length_rows if r.model == spec.model}
    lengths_per_prompt = defaultdict(set)
    for request in requests:
        _, dataset, prompt_id = (request.source or "").split(":")
        row = samples[(dataset, prompt_id)]
        assert request.output_tokens in row.samples
        assert request.prompt_tokens == row.input_tokens and request.prompt
        lengths_per_prompt[prompt_id].add(request.output_tokens)
        expected = "chat/" if request.slo_class is SLOClass.LATENCY else "code/"
        assert request.app.startswith(expected)
    assert any(len(v) > 1 for v in lengths_per_prompt.values())  # same prompt, different lengths


def test_compound_jobs_keep_their_stage_structure(length_rows) -> None:
    spec = WorkloadSpec(rps=2.0, duration_s=120.0, mix=ClassMix.parse("0:0:1"), seed=2, tiers=(2,))
    requests = build_workload(spec, length_rows=length_rows)
    jobs = defaultdict(list)
    for request in requests:
        jobs[request.job_id].append(request)
    workflow_sizes = {len(w.stages) for w in load_workflows()}
    for calls in jobs.values():
        assert stage_structure_errors(calls) == []
        stages = 1 + max(c.stage for c in calls)
        assert stages in workflow_sizes
        assert all(c.job_deadline_s == 20.0 * stages * 2 for c in calls)
    summary = summarize(requests)
    assert summary["compound"]["stage_structure_ok"] and summary["arrivals"] == len(jobs)


def test_ten_minute_trace_workload_matches_rate_and_mix(tmp_path: Path, length_rows) -> None:
    spec = WorkloadSpec(rps=3.0, duration_s=600.0, arrivals=str(azure_conv_trace_path()),
                        mix=ClassMix.parse("1:1:1:1"), seed=0)
    summary = summarize(build_workload(spec, length_rows=length_rows))
    assert abs(summary["rate_rps"] / 3.0 - 1) < 0.05
    for share in summary["mix"].values():
        assert abs(share / 0.25 - 1) < 0.05


def test_reader_reports_the_bad_line(tmp_path: Path) -> None:
    good = WorkloadRequest(id="a", arrival_s=0.0, slo_class=SLOClass.DEADLINE, deadline_s=5.0,
                           prompt_tokens=3, output_tokens=4).model_dump(exclude_none=True)
    cases = [
        ("{not json", ":2: not JSON"),
        (json.dumps({**good, "id": "b", "slo_class": "chat"}), ":2: slo_class"),
        (json.dumps({**good, "id": "b", "deadline_s": None}), "deadline SLO needs deadline_s"),
        (json.dumps({**good, "id": "b", "slo_class": "compound", "job_deadline_s": 3, "deadline_s": None}),
         "needs job_id and stage"),
        (json.dumps({**good, "id": "b", "output_tokens": 0}), ":2: output_tokens"),
        (json.dumps(good), "duplicate request id"),
    ]
    for line, message in cases:
        path = tmp_path / "w.jsonl"
        path.write_text(json.dumps(good) + "\n" + line + "\n")
        with pytest.raises(TempoError, match=message):
            read_workload(path)


def test_unknown_model_and_missing_trace_are_clear_errors(length_rows) -> None:
    with pytest.raises(TempoError, match="unknown served model"):
        build_workload(WorkloadSpec(rps=1.0, duration_s=10.0, model="gpt-9"), length_rows=length_rows)
    with pytest.raises(TempoError, match="trace file not found"):
        build_workload(WorkloadSpec(rps=1.0, duration_s=10.0, arrivals="/nope.csv"), length_rows=length_rows)
