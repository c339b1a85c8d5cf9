"""`tempo estimator eval` on a small CASTILLO-format file it has never seen, and its input errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import typer
from tempo.models.eval_cli import eval_command
from typer.testing import CliRunner

from tempo.errors import TempoError

WORDS = {"essay": 400, "word": 5, "list": 60}


def write_dataset(directory: Path, n_prompts: int = 150, seed: int = 0) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    rows, prompts = [], []
    for i in range(n_prompts):
        kind = list(WORDS)[i % 3]
        prompt_id = f"p{i}"
        text = f"Please {kind} about topic {i}"
        prompts.append({"prompt_id": prompt_id, "dataset": f"set{i % 2}", "prompt_text": text})
        for model, scale in (("small", 1.0), ("large", 1.6)):
            outs = [max(1, round(WORDS[kind] * scale * rng.lognormal(0, 0.3))) for _ in range(10)]
            rows.append({"dataset": f"set{i % 2}", "model": model, "prompt_id": prompt_id, "input_tokens": 8,
                         "outputs": outs})
    lengths, texts = directory / "lengths.jsonl", directory / "prompts.jsonl"
    lengths.write_text("\n".join(json.dumps(r) for r in rows))
    texts.write_text("\n".join(json.dumps(p) for p in prompts))
    return lengths, texts


def run(args: list[str]):
    app = typer.Typer()
    app.command()(eval_command)
    return CliRunner().invoke(app, args)


def test_eval_reports_every_method_on_unseen_data(tmp_path: Path) -> None:
    lengths, texts = write_dataset(tmp_path)
    out = tmp_path / "eval.json"
    result = run(["--json", str(out), "--data", str(lengths), "--prompts", str(texts), "--models", "small",
                  "--n-estimators", "40", "--leave-one-model-out", "large", "--recalibrate-n", "100"])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"small", "pooled"}
    small = report["results"]["small"]
    for method in ("tempo[lightgbm]", "baseline_a_dataset_quantile", "baseline_b_prompt_length",
                   "baseline_c_paper_qrf_q0.95", "floor_oracle_median"):
        assert method in small
    main = small["tempo[lightgbm]"]
    for key in ("coverage", "coverage_by_dataset", "reserved_per_used", "mean_slack_tokens", "pinball_loss",
                "kendall_tau_median", "ladder", "latency_ms", "train_s", "artifact_bytes"):
        assert key in main
    assert set(main["ladder"]) == {"k=0.5xB0", "k=0.7xB0"}
    assert main["reserved_per_used"] < small["baseline_a_dataset_quantile"]["reserved_per_used"]
    assert "baseline_a_dataset_model_quantile" in report["results"]["pooled"]
    lomo = report["leave_one_model_out"]
    assert lomo["held_out"] == "large" and set(lomo["after"]) == {"100"}
    after = lomo["after"]["100"]
    assert after["coverage"] > lomo["before_recalibration"]["coverage"]
    assert after["coverage_p10"] <= after["coverage"] <= after["coverage_p90"]


def test_cross_evaluation_tests_every_prompt_once(tmp_path: Path) -> None:
    lengths, texts = write_dataset(tmp_path, n_prompts=90)
    out = tmp_path / "eval.json"
    result = run(["--json", str(out), "--data", str(lengths), "--prompts", str(texts), "--models", "small",
                  "--no-pooled", "--folds", "3", "--baselines", "a,c", "--n-estimators", "30"])
    assert result.exit_code == 0, result.output
    small = json.loads(out.read_text())["results"]["small"]
    folds = small["data"]["samples_per_fold"]
    assert len(folds) == 3 and sum(f["test"] for f in folds) == small["tempo[lightgbm]"]["samples"] == 900
    assert "latency_ms" in small["tempo[lightgbm]"] and small["tempo[lightgbm]"]["ladder"]
    assert small["tempo[lightgbm]"]["train_s"] >= 0 and "latency_ms" in small["baseline_c_paper_qrf_q0.95"]


def test_fold_rows_partition_prompts_and_match_the_default_split() -> None:
    from tempo.data.castillo import LengthRow
    from tempo.models.dataset import fold_rows, split_rows

    rows = [LengthRow("d", "m", f"p{i}", 5, (3,)) for i in range(400)]
    everyone = sorted(r.prompt_id for r in rows)
    for split in ("test", "calibration"):  # each prompt tests once and calibrates once
        assert sorted(r.prompt_id for f in range(4) for r in fold_rows(rows, f, 4)[split]) == everyone
    for f in range(4):
        parts = fold_rows(rows, f, 4)
        assert sorted(r.prompt_id for rs in parts.values() for r in rs) == everyone
        assert 0.4 < len(parts["fit"]) / 400 < 0.6
    assert fold_rows(rows, 4, 5) == split_rows(rows)
    with pytest.raises(ValueError, match="fold"):
        fold_rows(rows, 3, 3)
    with pytest.raises(ValueError, match="at least 3"):
        fold_rows(rows, 0, 2)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--models", "gpt-9"], "not in"),
        (["--kinds", "xgboost"], "unknown"),
        (["--quantile", "1.5"], "--quantile"),
        (["--folds", "0"], "--folds"),
        (["--folds", "2"], "--folds"),
        (["--leave-one-model-out", "gpt-9", "--models", "none", "--no-pooled"], "has no rows"),
    ],
)
def test_eval_rejects_bad_arguments(tmp_path: Path, args: list[str], message: str) -> None:
    lengths, texts = write_dataset(tmp_path, n_prompts=30)
    result = run(["--json", str(tmp_path / "o.json"), "--data", str(lengths), "--prompts", str(texts), *args])
    assert isinstance(result.exception, TempoError) and message in str(result.exception)


def test_eval_rejects_a_malformed_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("dataset,model,prompt_id,input_tokens,out0\nA,m,p,lots,3\n")
    result = run(["--json", str(tmp_path / "o.json"), "--data", str(bad)])
    assert isinstance(result.exception, TempoError) and "bad.csv:2: malformed row" in str(result.exception)
