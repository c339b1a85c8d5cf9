"""`tempo estimator eval-graphs` on workflow files of shapes the shipped one lacks, and its input errors."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tempo.cli import main


def _ln(rng: np.random.Generator, median: float, sigma: float = 0.3) -> int:
    return max(1, round(float(rng.lognormal(math.log(median), sigma))))


def workflow(i: int, stages: list[list[tuple[int, int]]], app: str | None) -> dict[str, Any]:
    item: dict[str, Any] = {"request_id": i, "stages": [
        {"stage_number": s, "requests": [{"input_tokens": p, "output_tokens": o, "total_tokens": p + o}
                                         for p, o in calls]}
        for s, calls in enumerate(stages)]}
    if app is not None:
        item["app"] = app
    return item


def synthetic_file(path: Path, n: int = 150, seed: int = 0, apps: bool = True) -> Path:
    """Long chains of single calls, wide fan-outs, one-stage jobs (three apps), and three jobs of apps seen once."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            long = bool(rng.random() < 0.5)
            stages = [[(200, _ln(rng, 400 if long else 40))]]
            stages += [[(_ln(rng, 300), _ln(rng, 200))] for _ in range(int(rng.integers(8, 13)) if long else 2)]
            app = "chain"
        elif kind == 1:
            k = int(rng.integers(1, 17))
            fan = [(_ln(rng, 150), _ln(rng, 500)) for _ in range(k)]
            stages = [[(300, _ln(rng, 80))], fan, [(sum(o for _, o in fan), _ln(rng, 60 * k))]]
            app = "fanout"
        else:
            stages = [[(_ln(rng, 500), _ln(rng, 250))]]
            app = "single"
        items.append(workflow(i, stages, app if apps else None))
    for j in range(3):
        items.append(workflow(n + j, [[(100, 10)], [(100, 20)] * 4], f"brand-new-{j}" if apps else None))
    path.write_text(json.dumps(items))
    return path


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["estimator", "eval-graphs", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


FAST = ["--capacity", "30", "--latency-sizes", "20,200", "--stream-factor", "3"]


def test_eval_graphs_on_other_shapes_and_unseen_apps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = synthetic_file(tmp_path / "workflows.json")
    out = tmp_path / "report.json"
    code, stdout, stderr = run(["--data", str(data), "--json", str(out), "--seed", "1", *FAST], capsys)
    assert code == 0, stderr
    assert "critical-path decode tokens after stage s" in stdout and "match latency" in stdout
    report = json.loads(out.read_text())
    assert report["jobs"]["total"] == 153
    assert set(report["jobs"]["apps"]) >= {"chain", "fanout", "single"}
    assert report["jobs"]["test_apps_unseen"]  # at least one app the store never saw, estimated without a crash
    stages = report["per_stage"]
    assert len(stages) >= 10  # the long chains
    first = stages["0"]
    assert first["jobs"] == report["jobs"]["test"]
    for entry in stages.values():
        for name in ("decode_tokens_after", "tokens_after", "stages_after"):
            for method in ("graph", "profile"):
                assert 0.0 <= entry[name][method]["bound_coverage"] <= 1.0
                assert entry[name][method]["point_abs_error"]["p90"] >= entry[name][method]["point_abs_error"]["p50"]
    # after the first answer, the chain length is known to the matcher, not to the per-app quantiles
    assert stages["1"]["decode_tokens_after"]["error_ratio_p50"] < 0.75
    # general regressors see the same: the first answer tells a long chain from a short one
    assert report["predictability"]["1"]["error_ratio_mean"]["gradient_boosting"] < 0.75
    assert "what the attributes known at stage s can predict" in stdout
    assert set(report["latency"]) == {"20", "200"}
    assert report["latency"]["200"]["stored"] == 200 and report["latency"]["200"]["resampled"] > 0
    memory = report["memory"]
    assert memory["jobs"] == 90 and all(n <= 30 for n in memory["stored_per_app_end"].values())
    assert memory["nbytes_max_after_capacity"] >= memory["nbytes_min_after_capacity"] > 0


def test_eval_graphs_without_app_fields(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = synthetic_file(tmp_path / "workflows.json", n=60, apps=False)
    out = tmp_path / "report.json"
    code, _, stderr = run(["--data", str(data), "--json", str(out), *FAST], capsys)
    assert code == 0, stderr
    assert json.loads(out.read_text())["jobs"]["apps"] == ["deep_research"]


@pytest.mark.parametrize(("content", "message"), [
    ("{not json", "not JSON"),
    ("[]", "no usable workflows"),
    ('[{"request_id": 1}]', "malformed workflow entry"),
    ('[{"request_id": 1, "stages": [{"requests": [{"input_tokens": 5, "output_tokens": 5}]}]}]',
     "malformed workflow entry"),
    ('[{"request_id": 1, "stages": [{"stage_number": 0, "requests": [{"input_tokens": "x", "output_tokens": 5}]}]}]',
     "malformed workflow entry"),
    ('{"request_id": 1}', "malformed workflow entry"),
    ('[{"request_id": 1, "app": 7, "stages": [{"stage_number": 0, "requests": [{"input_tokens": 5, '
     '"output_tokens": 5}]}]}]', "'app' must be a non-empty string"),
    ('[{"request_id": 1, "stages": [{"stage_number": 0, "requests": [{"input_tokens": 5, "output_tokens": 5}]}]}]',
     "too few to split"),
])
def test_malformed_workflow_files_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      content: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    code, _, stderr = run(["--data", str(path), *FAST], capsys)
    assert code == 2
    assert stderr.startswith("tempo: error:") and message in stderr
    assert stderr.count("\n") == 1 and "Traceback" not in stderr


def test_bad_options_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = synthetic_file(tmp_path / "workflows.json", n=30)
    for args, message in ((["--data", str(tmp_path / "missing.json")], "no such file"),
                          (["--data", str(data), "--train-frac", "1.5"], "--train-frac"),
                          (["--data", str(data), "--quantile", "1"], "--quantile"),
                          (["--data", str(data), "--latency-sizes", "a,b"], "--latency-sizes")):
        code, _, stderr = run([*FAST, *args], capsys)
        assert code == 2 and message in stderr and stderr.count("\n") == 1, stderr


def test_predictability_tells_a_file_whose_early_stages_carry_no_information(tmp_path: Path) -> None:
    """Depth drawn independently of every attribute: no regressor beats the per-app median after stage 1,
    while knowing the depth would."""
    from tempo.models.eval_graphs import _Fallback, load_jobs, predictability, split_jobs

    rng = np.random.default_rng(3)
    items = [workflow(i, [[(200, _ln(rng, 100))]] + [[(_ln(rng, 300), _ln(rng, 200))]
                                                     for _ in range(int(rng.integers(2, 9)))], None)
             for i in range(300)]
    path = tmp_path / "random_depth.json"
    path.write_text(json.dumps(items))
    train, test = split_jobs(load_jobs(path), 0.5, 0)
    ratios = predictability(train, test, _Fallback(train, 0.9))["1"]["error_ratio_mean"]
    assert min(ratios[n] for n in ("gradient_boosting", "linear_median", "nearest_neighbours")) > 0.85, ratios
    assert ratios["true_stages"] < 0.6, ratios
