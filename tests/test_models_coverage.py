"""Calibration that survives small groups (issue #14): prompts as exchangeable units, the effective
number of calibration prompts, shrinkage toward the parent group, and artifacts of either format."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import norm
from tempo.models.artifact import load_artifact, save_artifact, verify_artifact
from tempo.models.calibration import (
    CALIBRATIONS,
    MondrianCalibrator,
    conformal_quantile,
    effective_count,
    rank_quantile,
    unit_inverse,
)
from tempo.models.features import FeatureSpec, RequestInfo
from tempo.models.length_bounds import LengthBoundModel, LengthSamples

# A clustered data set with known quantiles: 6 apps x 4 served models, 8 prompts per app, every prompt asked
# of every model 10 times. log(length / 100) = app effect + model effect + prompt effect (shared by the
# prompt's 40 samples) + sample noise, so a group's score is normal with a known quantile.
APPS = {"chat": 0.5, "code": 0.0, "qa": 0.2, "math": -0.2, "story": 0.8, "list": 0.1}
MODELS = {"m1": 0.0, "m2": 0.15, "m3": -0.1, "m4": 0.3}
PROMPT_SD, SAMPLE_SD = 0.6, 0.3
SCORE_SD = math.hypot(PROMPT_SD, SAMPLE_SD)


def clustered(rng: np.random.Generator, prompts_per_app: int = 8):
    raw, true, groups, units = [], [], [], []
    for a, app_effect in APPS.items():
        for _ in range(prompts_per_app):
            prompt_effect = rng.normal(0, PROMPT_SD)
            unit = len({u for u in units})
            for m, model_effect in MODELS.items():
                true.append(100 * np.exp(app_effect + model_effect + prompt_effect + rng.normal(0, SAMPLE_SD, 10)))
                raw.append(np.full(10, 100.0))
                groups += [(f"{m}|{a}", a)] * 10
                units += [unit] * 10
    return np.concatenate(raw), np.concatenate(true), groups, np.asarray(units)


def exact_coverage(cal: MondrianCalibrator) -> dict[str, float]:
    """Per app, the true coverage of the calibrated bound (mean over its served models), from the known
    normal distribution of the scores: no test sample is drawn, so no test noise."""
    return {a: float(np.mean([norm.cdf((cal.offset((f"{m}|{a}", a)) - e_a - e_m) / SCORE_SD)
                              for m, e_m in MODELS.items()]))
            for a, e_a in APPS.items()}


def test_sample_rank_undercovers_clustered_small_groups_and_the_prompt_rank_does_not() -> None:
    """Mean coverage over 40 calibration draws, q = 0.9: the calibration before #14 (rank over samples,
    hard fallback at 300 samples, +0.005 margin) under-covers; the default one covers every app."""
    rng = np.random.default_rng(0)
    old, new = [], []
    for _ in range(40):
        raw, true, groups, units = clustered(rng)
        rank, shrinkage = CALIBRATIONS["sample"]
        old.append(exact_coverage(MondrianCalibrator(0.905, margin=0.005, rank=rank, shrinkage=shrinkage)
                                  .fit(raw, true, groups)))
        new.append(exact_coverage(MondrianCalibrator(0.905, margin=0.005).fit(raw, true, groups, units)))
    old_by_app = {a: np.mean([r[a] for r in old]) for a in APPS}
    new_by_app = {a: np.mean([r[a] for r in new]) for a in APPS}
    assert np.mean(list(old_by_app.values())) < 0.89
    assert min(new_by_app.values()) >= 0.9
    assert np.mean(list(new_by_app.values())) <= 0.95  # conservative where it must be, not unbounded


def test_effective_count_lies_between_prompts_and_samples() -> None:
    rng = np.random.default_rng(1)
    units = np.repeat(np.arange(50), 10)
    alike = np.repeat(rng.normal(size=50), 10)  # a prompt's samples identical: 50 prompts' worth
    independent = rng.normal(size=500)  # no prompt effect: ~500
    mixed = alike + rng.normal(0, 1, 500)  # rho = 0.5: 500 / (1 + 9 * 0.5) ~ 91
    assert effective_count(alike, units) == pytest.approx(50)
    assert effective_count(independent, units) > 300
    assert 60 < effective_count(mixed, units) < 130
    assert effective_count(independent, np.arange(500)) == 500  # every sample its own unit
    # unequal prompt sizes: never below Kish's effective number of prompts
    sizes = np.array([1] * 40 + [30] * 5)
    uneven = np.repeat(np.arange(45), sizes)
    kish = sizes.sum() ** 2 / np.sum(sizes**2)
    assert effective_count(np.repeat(rng.normal(size=45), sizes), uneven) == pytest.approx(kish)


def test_rank_quantile_over_samples_prompts_and_effective_prompts() -> None:
    rng = np.random.default_rng(2)
    scores = rng.normal(size=300)
    units = unit_inverse(np.repeat(np.arange(30), 10), 300)
    value, n = rank_quantile(scores, 0.9, units, "sample")
    assert value == conformal_quantile(scores, 0.9) and n == 300
    by_prompt, n_prompts = rank_quantile(scores, 0.9, units, "prompt")
    by_effective, n_eff = rank_quantile(scores, 0.9, units, "effective")
    assert n_prompts == 30 and 30 <= n_eff <= 300
    # fewer effective units, a larger finite-sample correction
    assert value <= by_effective <= by_prompt
    assert by_prompt == np.sort(scores)[279 - 1]  # the ceil(0.9 * (1 + 1/30) * 300) = 279th
    assert rank_quantile(scores[:40], 0.95, units[:40], "prompt")[0] == math.inf  # 4 prompts cannot give 0.95
    with pytest.raises(ValueError, match="rank"):
        rank_quantile(scores, 0.9, units, "bogus")


def test_small_groups_shrink_toward_their_parent_and_large_ones_keep_their_own_offset() -> None:
    rng = np.random.default_rng(3)
    raw_parts, true_parts, groups, units = [], [], [], []
    layout = {"big": (200, 0.0), "small": (2, 1.0)}  # prompts, log-offset of the group
    for name, (prompts, shift) in layout.items():
        for p in range(prompts):
            effect = rng.normal(0, 0.3)
            true_parts.append(100 * np.exp(shift + effect + rng.normal(0, 0.3, 10)))
            raw_parts.append(np.full(10, 100.0))
            groups += [(f"m|{name}", name)] * 10
            units += [f"{name}{p}"] * 10
    raw, true = np.concatenate(raw_parts), np.concatenate(true_parts)
    cal = MondrianCalibrator(0.9, shrinkage=5.0).fit(raw, true, groups, units)
    summary = cal.summary()
    assert summary["small"]["prompts"] == 2 and summary["big"]["prompts"] == 200
    n_small = summary["small"]["effective_prompts"]
    assert 2 <= n_small <= 20
    assert summary["small"]["own_weight"] == pytest.approx(n_small / (n_small + 5.0), abs=1e-3)
    assert summary["big"]["own_weight"] > 0.95
    # the served model | app group holds the app's samples: it inherits the app's offset (weight 0)
    assert summary["m|small"]["own_weight"] == 0 and cal.offset(("m|small", "small")) == cal.offset("small")
    hard = MondrianCalibrator(0.9, rank="effective", shrinkage=None).fit(raw, true, groups, units)
    assert "small" not in hard.by_group_  # 20 samples < min_group: the hard fallback to the pooled offset
    own_small = rank_quantile(np.log(true[-20:] / 100), 0.9, unit_inverse(np.repeat([0, 1], 10), 20))[0]
    # shrunk: between the pooled offset and what its two prompts alone would say
    low, high = sorted((cal.pooled_, own_small if math.isfinite(own_small) else np.log(true[-20:] / 100).max()))
    assert low < cal.offset("small") < high
    # the unseen group falls back to the pooled offset
    assert cal.offset(("m|new", "new")) == cal.pooled_


def test_shrinkage_must_be_nonnegative_and_rank_known() -> None:
    with pytest.raises(ValueError):
        MondrianCalibrator(0.9, shrinkage=-1.0)
    with pytest.raises(ValueError):
        MondrianCalibrator(0.9, rank="prompts")


def test_manifests_from_before_issue_14_load_as_the_old_calibrator() -> None:
    old = {"quantile": 0.905, "min_group": 300, "pooled": 0.3, "by_group": {"a": 0.5}, "counts": {"a": 400}}
    cal = MondrianCalibrator.from_dict(old)
    assert cal.rank == "sample" and cal.shrinkage is None
    assert cal.offset(("m|a", "a")) == 0.5 and cal.offset("b") == 0.3
    again = MondrianCalibrator.from_dict(cal.to_dict())
    assert again.to_dict() == cal.to_dict()


SPEC = FeatureSpec(n_hash=1 << 10, svd_dims=6)


def _samples(n_prompts: int, seed: int) -> LengthSamples:
    rng = np.random.default_rng(seed)
    requests, index, lengths = [], [], []
    for i in range(n_prompts):
        long = i % 2 == 0
        requests.append(RequestInfo(10, app=f"app{i % 3}", model="m",
                                    prompt=f"{'Write an essay' if long else 'Say one word'} about thing {i}"))
        effect = rng.normal(0, 0.4)
        for _ in range(10):
            index.append(len(requests) - 1)
            lengths.append(max(1.0, round((300 if long else 8) * np.exp(effect + rng.normal(0, 0.3)))))
    return LengthSamples(requests, np.array(index), np.array(lengths))


def test_artifacts_keep_the_effective_counts_and_old_artifacts_still_load(tmp_path: Path) -> None:
    model = LengthBoundModel(quantile=0.9, spec=SPEC, model_params={"n_estimators": 20, "min_child_samples": 20})
    model.fit(_samples(200, 0)).calibrate(_samples(120, 1))
    assert model.calibration_ is not None
    assert model.calibration_.effective and all(n > 0 for n in model.calibration_.effective)
    directory = tmp_path / "new"
    save_artifact(model, directory)
    level0 = verify_artifact(directory)["calibration"]["level0"]
    assert level0["rank"] == "effective" and level0["shrinkage"] == CALIBRATIONS["shrink"][1]
    assert set(level0["effective"]) == set(level0["counts"]) and level0["pooled_effective"] > 0
    test = _samples(50, 2).requests
    assert np.array_equal(load_artifact(directory).predict_bound(test), model.predict_bound(test))

    # the same artifact written the way it was before issue #14: no rank, counts only, no ladder counts
    old = tmp_path / "old"
    shutil.copytree(directory, old)
    manifest = json.loads((old / "manifest.json").read_text())
    calibration = manifest["calibration"]
    calibration.pop("effective")
    for key in ("margin", "rank", "shrinkage", "units", "effective", "weights", "pooled_effective"):
        calibration["level0"].pop(key)
    params = {k: manifest[k] for k in (
        "quantile", "kind", "feature_spec", "fractions", "k_draws", "k_max", "coverage_margin",
        "min_survivors", "seed", "model_params", "text_score_alpha", "calibration")}
    digest = hashlib.sha256(json.dumps([manifest["files"], params], sort_keys=True).encode())
    manifest["version"] = digest.hexdigest()[:16]
    (old / "manifest.json").write_text(json.dumps(manifest))
    loaded = load_artifact(old)
    assert loaded.calibration_ is not None and loaded.calibration_.level0.rank == "sample"
    assert np.array_equal(loaded.predict_bound(test), model.predict_bound(test))
    assert loaded.predict_ladders(test[:3]) == model.predict_ladders(test[:3])
    # an old calibration recalibrates the old way: few completions, one pooled offset
    few = _samples(20, 3)
    recal = loaded.recalibrated(few)
    assert recal.calibration_ is not None and recal.calibration_.level0.by_group_ == {}


def test_recalibration_is_per_served_model_and_app_with_shrinkage() -> None:
    model = LengthBoundModel(quantile=0.9, spec=SPEC, model_params={"n_estimators": 20, "min_child_samples": 20})
    model.fit(_samples(200, 0)).calibrate(_samples(120, 1))
    new = _samples(90, 4)
    shifted = LengthSamples(new.requests, new.request_index,
                            np.ceil(new.lengths * np.array([2.0 if r.app == "app0" else 1.0
                                                            for r in new.requests])[new.request_index]))
    recal = model.recalibrated(shifted.subset(np.arange(0, len(shifted), 3)))
    assert recal.calibration_ is not None
    level0 = recal.calibration_.level0
    assert 0 < level0.weights_["app0"] < 1 and level0.offset("app0") > level0.offset("app1")
    test = _samples(60, 5)
    factor = np.array([2.0 if r.app == "app0" else 1.0 for r in test.requests])[test.request_index]
    truth = np.ceil(test.lengths * factor)
    bound = recal.predict_bound(test.requests)[test.request_index]
    app0 = np.array([test.requests[i].app == "app0" for i in test.request_index])
    assert np.mean(truth[app0] <= bound[app0]) > 0.8
