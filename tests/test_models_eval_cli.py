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
    # each draw splits the held-out model's prompts in two: the pool it recalibrates on, the traffic it serves
    assert lomo["split"].startswith("random halves")
    assert abs(lomo["recalibration_pool"]["prompts"] - lomo["test"]["prompts"]) <= 1


def test_leave_one_model_out_draws_split_the_prompts_in_disjoint_halves(tmp_path: Path) -> None:
    from tempo.data.castillo import load_length_rows, load_prompts
    from tempo.models.eval_cli import _halves

    lengths, texts = write_dataset(tmp_path)
    rows = [r for r in load_length_rows(lengths) if r.model == "large"]
    prompts = load_prompts(texts)
    rng = np.random.default_rng(0)
    firsts = []
    for _ in range(3):
        pool, test = _halves(rows, prompts, rng)
        a, b = set(pool.sample_units.tolist()), set(test.sample_units.tolist())
        assert len(pool) + len(test) == sum(len(r.samples) for r in rows) and abs(len(a) - len(b)) <= 1
        firsts.append(sorted(str(r.prompt) for r in pool.requests))
    assert firsts[0] != firsts[1]  # a new split each draw


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


def write_pair(directory: Path, n_prompts: int, first: int, seed: int, models=(("small", 1.0), ("large", 1.6)),
               name: str = "set") -> tuple[Path, Path]:
    """A CASTILLO-format lengths file and its prompts, prompt ids p{first}..p{first + n_prompts - 1}."""
    rng = np.random.default_rng(seed)
    rows, prompts = [], []
    for i in range(first, first + n_prompts):
        kind = list(WORDS)[i % 3]
        prompts.append({"prompt_id": f"p{i}", "prompt_text": f"Please {kind} about topic {i}"})
        for model, scale in models:
            outs = [max(1, round(WORDS[kind] * scale * rng.lognormal(0, 0.3))) for _ in range(10)]
            rows.append({"dataset": f"set{i % 2}", "model": model, "prompt_id": f"p{i}", "input_tokens": 8,
                         "outputs": outs})
    lengths, texts = directory / f"{name}_lengths.jsonl", directory / f"{name}_prompts.jsonl"
    lengths.write_text("\n".join(json.dumps(r) for r in rows))
    texts.write_text("\n".join(json.dumps(p) for p in prompts))
    return lengths, texts


def test_train_on_one_file_and_test_on_another(tmp_path: Path) -> None:
    train_l, train_p = write_pair(tmp_path, 120, 0, 0, name="train")
    test_l, test_p = write_pair(tmp_path, 60, 1000, 1, models=(("small", 1.0), ("large", 1.6), ("new", 2.0)),
                                name="test")
    out = tmp_path / "eval.json"
    result = run(["--json", str(out), "--train", f"{train_l},{train_p}", "--test", f"{test_l},{test_p}",
                  "--baselines", "a", "--n-estimators", "30", "--calibration", "shrink,sample",
                  "--leave-one-model-out", "large", "--recalibrate-n", "40", "--draws", "3"])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    pooled = report["results"]["pooled"]
    assert pooled["data"]["test"] == 60 * 3 * 10 and pooled["data"]["prompts"] == {"train": 120, "test": 60}
    main, old = pooled["tempo[lightgbm]"], pooled["tempo[lightgbm|sample]"]
    assert set(main["coverage_by_model"]) == {"small", "large", "new"}  # "new" is a served model never seen
    calibration = main["calibration"]
    assert calibration["method"] == "shrink" and calibration["rank"] == "effective"
    assert calibration["pooled_effective_prompts"] > 0
    group = calibration["groups"]["set0"]
    assert group["prompts"] <= group["effective_prompts"] <= group["samples"] and 0 < group["own_weight"] < 1
    assert old["calibration"]["rank"] == "sample"
    lomo = report["leave_one_model_out"]
    assert set(lomo["by_calibration"]) == {"shrink", "sample"}
    after = lomo["after"]["40"]
    assert set(after["coverage_by_dataset"]) == {"set0", "set1"}
    assert after["min_dataset_mean_coverage"] == min(after["coverage_by_dataset"].values())
    assert lomo["test"]["prompts"] == 60


def test_subsample_keeps_a_seeded_fraction_of_the_prompts(tmp_path: Path) -> None:
    from tempo.data.castillo import load_length_rows
    from tempo.models.eval_cli import subsample_rows

    lengths, _ = write_dataset(tmp_path, n_prompts=400)
    rows = load_length_rows(lengths)
    kept = {r.prompt_id for r in subsample_rows(rows, 0.25, seed=0)}
    assert 70 < len(kept) < 130
    assert kept == {r.prompt_id for r in subsample_rows(rows, 0.25, seed=0)}  # seeded
    assert kept != {r.prompt_id for r in subsample_rows(rows, 0.25, seed=1)}
    assert {r.prompt_id for r in subsample_rows(rows, 0.1, seed=0)} <= kept  # nested
    kept_rows = subsample_rows(rows, 0.25, seed=0)
    assert len(kept_rows) == 2 * len(kept)  # a kept prompt keeps all its rows

    out = tmp_path / "eval.json"
    lengths, texts = write_dataset(tmp_path, n_prompts=300)
    result = run(["--json", str(out), "--data", str(lengths), "--prompts", str(texts), "--subsample", "0.5",
                  "--baselines", "none", "--n-estimators", "20", "--folds", "3"])
    assert result.exit_code == 0, result.output
    config = json.loads(out.read_text())["config"]
    assert config["subsample"] == 0.5 and config["prompts_in_file"] == 300 and 110 < config["prompts_kept"] < 190


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--subsample", "0"], "--subsample"),
        (["--subsample", "1.5"], "--subsample"),
        (["--calibration", "magic"], "--calibration"),
        (["--train", "TRAIN"], "go together"),
        (["--test", "TEST"], "go together"),
        (["--train", "TRAIN", "--test", "TEST", "--data", "DATA"], "replace --data"),
        (["--train", "TRAIN", "--test", "TEST", "--folds", "5"], "--folds applies"),
        (["--train", "a,b,c", "--test", "TEST"], "LENGTHS,PROMPTS"),
        (["--train", "TRAIN", "--test", "OVERLAP"], "share"),
        (["--train", "TRAIN", "--test", "TEST", "--models", "large,ghost"], "not in"),
        (["--train", "TRAIN", "--test", "TEST", "--leave-one-model-out", "ghost", "--no-pooled",
          "--models", "none"], "--leave-one-model-out"),
        (["--train", "TRAIN,missing.jsonl", "--test", "TEST"], "file not found"),
        (["--leave-one-model-out", "large", "--recalibrate-n", "0"], "--recalibrate-n"),
    ],
)
def test_eval_train_test_and_subsample_errors(tmp_path: Path, args: list[str], message: str) -> None:
    lengths, texts = write_dataset(tmp_path, n_prompts=30)
    train_l, train_p = write_pair(tmp_path, 30, 0, 0, name="train")
    test_l, test_p = write_pair(tmp_path, 30, 500, 1, name="test")
    overlap_l, overlap_p = write_pair(tmp_path, 30, 20, 2, name="overlap")
    names = {"TRAIN": f"{train_l},{train_p}", "TEST": f"{test_l},{test_p}", "OVERLAP": f"{overlap_l},{overlap_p}",
             "DATA": str(lengths)}
    args = [names.get(a, a.replace("missing.jsonl", str(tmp_path / "missing.jsonl"))) for a in args]
    extra = [] if "--train" in args else ["--data", str(lengths), "--prompts", str(texts)]
    result = run(["--json", str(tmp_path / "o.json"), *extra, *args])
    assert isinstance(result.exception, TempoError), result.output
    assert message in str(result.exception)


def test_overlapping_prompts_can_be_dropped_from_the_test_file(tmp_path: Path) -> None:
    train_l, train_p = write_pair(tmp_path, 120, 0, 0, name="train")
    test_l, test_p = write_pair(tmp_path, 50, 100, 1, name="test")  # p100..p119 are in both
    out = tmp_path / "eval.json"
    result = run(["--json", str(out), "--train", f"{train_l},{train_p}", "--test", f"{test_l},{test_p}",
                  "--drop-overlap", "--baselines", "none", "--n-estimators", "20", "--no-pooled", "--models", "small"])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["config"]["dropped_test_prompts"] == 20 and report["config"]["dropped_test_rows"] == 40
    assert report["results"]["small"]["data"]["prompts"] == {"train": 120, "test": 30}
