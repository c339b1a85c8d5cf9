"""``tempo estimator train``: an artifact from a small CASTILLO-format file it has never seen, that verifies,
loads, is served and publishes; and its input errors (one line, exit 2)."""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from tempo.estimator.engine import Estimator, ServedModel
from tempo.estimator.schemas import EstimateRequest
from tempo.models.artifact import load_artifact, verify_artifact

from tempo.cli import main

WORDS = {"essay": 400, "word": 5, "list": 60}


def write_dataset(directory: Path, n_prompts: int = 100, models: tuple[str, ...] = ("small", "large"),
                  csv_gz: bool = False, seed: int = 0) -> tuple[Path, Path]:
    """Lengths driven by the prompt's first word, for served models and datasets CASTILLO does not have."""
    rng = np.random.default_rng(seed)
    rows: list[dict[str, Any]] = []
    prompts: list[dict[str, str]] = []
    for i in range(n_prompts):
        kind = list(WORDS)[i % 3]
        prompt_id = f"p{i}"
        prompts.append({"prompt_id": prompt_id, "prompt_text": f"{kind} please, on topic {i}"})
        for m, model in enumerate(models):
            outs = [max(1, round(WORDS[kind] * (1 + 0.6 * m) * rng.lognormal(0, 0.3))) for _ in range(10)]
            rows.append({"dataset": f"set{i % 2}", "model": model, "prompt_id": prompt_id, "input_tokens": 8,
                         "outputs": outs})
    texts = directory / "prompts.jsonl"
    texts.write_text("\n".join(json.dumps(p) for p in prompts))
    if not csv_gz:
        lengths = directory / "lengths.jsonl"
        lengths.write_text("\n".join(json.dumps(r) for r in rows))
        return lengths, texts
    lengths = directory / "lengths.csv.gz"
    with gzip.open(lengths, "wt", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["dataset", "model", "prompt_id", "input_tokens", *(f"out{i}" for i in range(10))])
        for r in rows:
            writer.writerow([r["dataset"], r["model"], r["prompt_id"], r["input_tokens"], *r["outputs"]])
    return lengths, texts


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], str]:
    """One training run shared by the tests that read its artifact (training is the slow part)."""
    directory = tmp_path_factory.mktemp("train")
    lengths, texts = write_dataset(directory)
    out, report = directory / "artifact", directory / "report.json"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["estimator", "train", "--data", str(lengths), "--prompts", str(texts), "--out", str(out),
                     "--n-estimators", "20", "--json", str(report)])
    assert code == 0
    return out, json.loads(report.read_text()), stdout.getvalue()


def test_train_writes_a_verified_artifact_with_its_holdout_metrics(trained: tuple[Path, dict[str, Any], str]) -> None:
    out, report, printed = trained
    manifest = verify_artifact(out)
    assert manifest["version"] == report["version"] and manifest["quantile"] == 0.9
    assert manifest["model_params"]["n_estimators"] == 20
    holdout = manifest["metrics"]["holdout"]
    assert holdout == report["holdout"]
    assert set(holdout["coverage_by_dataset"]) == {"set0", "set1"}
    assert set(holdout["coverage_by_model"]) == {"small", "large"}
    assert 0.75 <= holdout["coverage"] <= 1 and holdout["reserved_per_used"] > 1
    assert holdout["samples"] == report["samples"]["test"]
    summary = manifest["data_summary"]
    assert summary["models"] == ["large", "small"] and summary["rows"] == report["rows"]
    assert all(n >= 10 for n in report["prompts"].values())
    assert sum(report["rows"].values()) == 200  # every row in exactly one split
    assert report["version"] in printed and "held-back coverage" in printed and "set0" in printed
    model = load_artifact(out)
    assert model.spec.models == ("large", "small") and model.calibration_ is not None


def test_the_service_engine_serves_the_trained_artifact(trained: tuple[Path, dict[str, Any], str]) -> None:
    out, _, _ = trained
    estimator = Estimator(0.9)
    estimator.swap(ServedModel.load(out))
    essay, word = estimator.estimate([
        EstimateRequest(prompt="essay please, on topic 7", slo_class="latency", app="set0", model="small"),
        EstimateRequest(prompt="word please, on topic 7", slo_class="latency", app="set0", model="small")])
    assert essay.source == word.source == "batch" and essay.model_version == out.name  # the directory
    assert essay.upper_bound > word.upper_bound


def test_publish_accepts_the_trained_artifact(trained: tuple[Path, dict[str, Any], str], redis_client: redis.Redis,
                                              redis_url: str, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    out, report, _ = trained
    assert main(["estimator", "publish", str(out), "--redis-url", redis_url,
                 "--artifacts", str(tmp_path / "artifacts")]) == 0
    assert json.loads(capsys.readouterr().out)["candidate"] == report["version"]
    verify_artifact(tmp_path / "artifacts" / str(report["version"]))


def test_one_named_model_from_a_csv_gz_file(tmp_path: Path) -> None:
    lengths, texts = write_dataset(tmp_path, n_prompts=80, csv_gz=True)
    out, report = tmp_path / "a", tmp_path / "r.json"
    assert main(["estimator", "train", "--data", str(lengths), "--prompts", str(texts), "--out", str(out),
                 "--models", "large", "--n-estimators", "10", "--quantile", "0.8", "--seed", "3",
                 "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    assert result["models"] == ["large"] and "coverage_by_model" not in result["holdout"]
    assert sum(result["rows"].values()) == 80
    manifest = verify_artifact(out)
    assert manifest["quantile"] == 0.8 and manifest["seed"] == 3 and manifest["data_summary"]["models"] == ["large"]


def _one_line_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tempo: error:") and "\n" not in err, err
    return err


@pytest.mark.parametrize(("case", "expected"), [
    ("missing lengths", "file not found"),
    ("missing prompts", "file not found"),
    ("malformed lengths", "lengths.jsonl:2: not JSON"),
    ("unknown model", "present: large, small"),
    ("non-empty out", "not empty"),
    ("out is a file", "not a directory"),
    ("too few prompts", "each split needs at least 10"),
    ("quantile", "--quantile must be in (0, 1)"),
    ("quantile too high for the data", "needs at least 999"),
    ("wrong prompts file", "matching prompts file"),
])
def test_user_errors_print_one_line_and_exit_2(case: str, expected: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    lengths, texts = write_dataset(tmp_path, n_prompts=12 if case == "too few prompts" else 60)
    out = tmp_path / "out"
    extra: list[str] = []
    if case == "missing lengths":
        lengths = tmp_path / "nope.csv"
    elif case == "missing prompts":
        texts = tmp_path / "nope.jsonl"
    elif case == "malformed lengths":
        lengths.write_text(lengths.read_text().split("\n", 1)[0] + "\n{oops\n")
    elif case == "unknown model":
        extra = ["--models", "small,huge"]
    elif case == "non-empty out":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "out is a file":
        out.write_text("mine")
    elif case == "quantile":
        extra = ["--quantile", "1"]
    elif case == "quantile too high for the data":
        extra = ["--quantile", "0.995"]
    elif case == "wrong prompts file":
        texts.write_text(json.dumps({"prompt_id": "other", "prompt_text": "x"}))
    err = _one_line_error(["estimator", "train", "--data", str(lengths), "--prompts", str(texts), "--out", str(out),
                           "--n-estimators", "5", *extra], capsys)
    assert expected in err
    if case == "unknown model":
        assert "huge" in err and "small," not in err.split("present")[0]
    if case == "non-empty out":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]  # left as it was
    elif case not in ("out is a file",):
        assert not out.exists()  # nothing written on a refusal
