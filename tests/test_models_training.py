"""Training, calibration, ladders and artifacts of the length model on synthetic prompts whose
length depends on their wording (so text must matter), and on malformed data files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from tempo.data.castillo import load_length_rows
from tempo.models.artifact import ArtifactError, load_artifact, save_artifact, verify_artifact
from tempo.models.evaluation import bound_metrics, empirical_quantile_bounds, ladder_metrics
from tempo.models.features import FeatureSpec, RequestInfo
from tempo.models.length_bounds import LengthBoundModel, LengthSamples
from tempo.scheduler.bounds import BoundQuery
from tempo.scheduler.slo import SLOClass

from tempo.errors import TempoError

TEMPLATES = {  # wording -> median length
    "Write a detailed essay about {}.": 600,
    "Answer in one word: what is {}?": 6,
    "List five facts about {}.": 90,
}
TOPICS = ["rivers", "graphs", "bread", "stars", "tax law", "jazz", "owls", "ice", "glass", "maps"]
SPEC = FeatureSpec(n_hash=1 << 12, svd_dims=12)


def synthetic(n_prompts: int, seed: int) -> LengthSamples:
    rng = np.random.default_rng(seed)
    requests, index, lengths = [], [], []
    templates = list(TEMPLATES.items())
    for i in range(n_prompts):
        template, median = templates[rng.integers(len(templates))]
        prompt = template.format(f"{TOPICS[rng.integers(len(TOPICS))]} #{i}")
        requests.append(RequestInfo(len(prompt) // 4, app=f"app{i % 2}", model="m", prompt=prompt))
        for _ in range(10):
            index.append(len(requests) - 1)
            lengths.append(max(1.0, round(median * rng.lognormal(0, 0.35))))
    return LengthSamples(requests, np.array(index), np.array(lengths))


@pytest.fixture(scope="module")
def trained() -> tuple[LengthBoundModel, LengthSamples]:
    model = LengthBoundModel(quantile=0.9, spec=SPEC, model_params={"n_estimators": 80, "min_child_samples": 50})
    model.fit(synthetic(600, 0)).calibrate(synthetic(300, 1))
    return model, synthetic(300, 2)


def test_calibrated_bounds_cover_and_use_the_text(trained) -> None:
    model, test = trained
    bound = model.predict_bound(test.requests)[test.request_index]
    metrics = bound_metrics(test.lengths, bound, test.sample_apps, 0.9)
    assert 0.87 <= metrics["coverage"] <= 0.95
    # the no-text baseline cannot tell an essay from a one-word answer
    no_text = empirical_quantile_bounds(synthetic(600, 0), test, 0.9)
    assert metrics["reserved_per_used"] < 0.6 * float(no_text.sum() / test.lengths.sum())


def test_ladder_keeps_coverage_among_survivors(trained) -> None:
    model, test = trained
    ladder = ladder_metrics(model, test)["k=0.7xB0"]
    assert ladder["survivors"] > 100
    assert ladder["coverage_ladder"] >= 0.85
    assert ladder["coverage_ladder"] > ladder["coverage_keep_b0"]


def test_model_is_a_bound_provider(trained) -> None:
    model, _ = trained
    essay_prompt, word_prompt = "Write a detailed essay about owls.", "Answer in one word: what is ice?"
    queries = [BoundQuery("a", 12, SLOClass.LATENCY, app="app0", model="m", prompt=essay_prompt),
               BoundQuery("b", 12, SLOClass.DEADLINE, app="app1", model="m", prompt=word_prompt)]
    essay, word = model.ladders(queries)
    assert essay.initial > 5 * word.initial
    assert all(b > k for k, b in essay.steps)


def test_artifact_round_trip_and_tamper_rejection(trained, tmp_path: Path) -> None:
    model, test = trained
    directory = tmp_path / "v1"
    version = save_artifact(model, directory, data_summary={"rows": 600})
    manifest = verify_artifact(directory)
    assert manifest["version"] == version and set(manifest["files"]) >= {"lightgbm.txt", "svd_components.npy"}
    loaded = load_artifact(directory)
    requests = test.requests[:40]
    assert np.array_equal(loaded.predict_bound(requests), model.predict_bound(requests))
    assert loaded.predict_ladders(requests[:3]) == model.predict_ladders(requests[:3])

    tampered = tmp_path / "tampered"
    shutil.copytree(directory, tampered)
    with (tampered / "lightgbm.txt").open("a") as handle:
        handle.write("\n")
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        load_artifact(tampered)

    forged = tmp_path / "forged"
    shutil.copytree(directory, forged)
    manifest_path = forged / "manifest.json"
    data = json.loads(manifest_path.read_text())
    data["calibration"]["level0"]["pooled"] = -5.0  # shrink every bound
    manifest_path.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="tampered"):
        load_artifact(forged)

    with pytest.raises(ArtifactError, match="not empty"):
        save_artifact(model, directory)


def test_recalibration_on_a_shifted_model_restores_coverage(trained) -> None:
    model, test = trained
    shifted = LengthSamples(test.requests, test.request_index, np.ceil(test.lengths * 1.5))
    before = np.mean(shifted.lengths <= model.predict_bound(test.requests)[test.request_index])
    few = shifted.subset(np.arange(0, len(shifted), 7)[:200])
    recal = model.recalibrated(few)
    after = np.mean(shifted.lengths <= recal.predict_bound(test.requests)[test.request_index])
    assert before < 0.8 and after > 0.85


def test_malformed_length_files_are_clear_errors(tmp_path: Path) -> None:
    bad_json = tmp_path / "rows.jsonl"
    bad_json.write_text('{"dataset": "A", "model": "m", "prompt_id": "p", "input_tokens": 3, "outputs": [1, 2]}\n'
                        '{"dataset": "A", "model": "m", "input_tokens": 3, "outputs": [4]}\n')
    with pytest.raises(TempoError, match=r"rows.jsonl:2: malformed row"):
        load_length_rows(bad_json)
    not_castillo = tmp_path / "rows.csv"
    not_castillo.write_text("a,b\n1,2\n")
    with pytest.raises(TempoError, match="missing columns"):
        load_length_rows(not_castillo)
    good = tmp_path / "ok.jsonl"
    good.write_text('{"dataset": "A", "model": "m", "prompt_id": "p", "input_tokens": 3, "outputs": [5, 15001]}\n')
    assert load_length_rows(good)[0].samples == (5,)
