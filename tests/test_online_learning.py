"""The online learner (models/online.py): adaptive calibration under drift, River cold start, JSON state."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tempo.models.features import FeatureSpec, PromptSketch, RequestInfo
from tempo.models.online import AdaptiveCalibrator, Observation, OnlineLengthLearner, OnlineQuantileModel


def test_calibrator_recovers_target_coverage_after_a_shift() -> None:
    rng = np.random.default_rng(1)
    cal = AdaptiveCalibrator(quantile=0.9)
    covered = [cal.learn_one(100.0, rng.lognormal(np.log(50), 0.5)) for _ in range(2000)]
    assert abs(np.mean(covered[-1000:]) - 0.9) < 0.03
    covered = [cal.learn_one(100.0, rng.lognormal(np.log(150), 0.5)) for _ in range(2000)]  # x3 longer
    assert np.mean(covered[:50]) < 0.8  # the shift hurts at first ...
    assert abs(np.mean(covered[-1000:]) - 0.9) < 0.03  # ... then coverage is back on target


def test_calibrator_scores_before_learning() -> None:
    cal = AdaptiveCalibrator(quantile=0.9)
    assert cal.learn_one(100.0, 150.0) is False  # judged against the bound served (100), not the updated one
    assert cal.factor() > 1.0


def test_river_model_answers_cold_and_learns() -> None:
    model = OnlineQuantileModel(quantile=0.9, prior_length=512)
    x = {"a": 1.0}
    assert model.predict_one(x) == 512.0 or abs(model.predict_one(x) - 512.0) < 1e-6
    rng = np.random.default_rng(0)
    for _ in range(3000):
        model.learn_one(x, float(rng.lognormal(np.log(40), 0.3)))
    assert 40 < model.predict_one(x) < 120  # near the 0.9 quantile of lengths around 40 (~59)


def _obs(model: str, app: str, length: float, bound: float | None, text: str = "hello world") -> Observation:
    sketch = PromptSketch.of(text, FeatureSpec())
    return Observation(RequestInfo(20, app, model, "latency", sketch=sketch), sketch, length, bound)


def test_learner_routes_unseen_models_to_river_once_it_has_data() -> None:
    learner = OnlineLengthLearner(quantile=0.9, river_min_obs=10)
    request = RequestInfo(20, "NewApp", "new-model", "latency")
    assert learner.source_for(request, batch_knows=False) == "batch"
    for _ in range(10):
        learner.learn_one(_obs("new-model", "NewApp", 300.0, 100.0))
    assert learner.source_for(request, batch_knows=False) == "river"
    assert learner.source_for(request, batch_knows=True) == "batch"
    assert learner.factor("batch", "new-model", "NewApp") == 1.0  # fewer than min_obs so far


def test_learner_state_roundtrips_through_json() -> None:
    learner = OnlineLengthLearner(quantile=0.9, min_obs=5)
    rng = np.random.default_rng(0)
    for i in range(50):
        learner.learn_one(_obs("m", "A", float(rng.integers(50, 500)), 200.0, text=f"prompt {i % 7}"))
    clone = OnlineLengthLearner.from_dict(json.loads(json.dumps(learner.to_dict())))
    assert clone.factor("batch", "m", "A") == learner.factor("batch", "m", "A")
    obs = _obs("m", "A", 100.0, 200.0, text="prompt 3")
    assert clone.river_bound(obs.request, obs.sketch) == learner.river_bound(obs.request, obs.sketch)
    learner.learn_one(obs)
    clone.learn_one(obs)
    assert clone.to_dict() == learner.to_dict()


def test_reset_source_forgets_only_that_source() -> None:
    learner = OnlineLengthLearner(quantile=0.9, min_obs=1)
    learner.learn_one(_obs("m", "A", 500.0, 100.0))
    assert learner.factor("batch", "m", "A") > 1.0
    learner.reset_source("batch")
    assert learner.factor("batch", "m", "A") == 1.0
    assert any(k.startswith("river|") for k in learner.calibrators_)


def test_calibrate_source_learns_only_that_sources_calibrators() -> None:
    learner = OnlineLengthLearner(quantile=0.9, min_obs=10)
    observations = [_obs("m", "A", 50.0, None) for _ in range(40)]
    learner.calibrate_source("batch", observations, [400.0] * 40)  # the new model bounds 8x the lengths
    assert learner.factor("batch", "m", "A") < 1.0
    assert not any(k.startswith("river|") for k in learner.calibrators_)
    assert learner.n_applied_ == 0 and not learner.counts_  # a calibration pass, not new completions


def test_a_swapped_in_model_starts_calibrated_on_the_recent_completions() -> None:
    pytest.importorskip("sklearn")
    from tempo.estimator.castillo_stream import small_artifact
    from tempo.estimator.engine import Estimator, ServedModel

    served = ServedModel.load(small_artifact())
    records = [{"prompt": f"say hi {i}", "prompt_tokens": 4, "app": "Alpaca", "model": "m", "slo_class": "latency",
                "output_tokens": 2, "finish_reason": "stop"} for i in range(120)]
    factors = {}
    for recent_size in (500, 0):  # 0: keeps no completion, so a swap starts from the raw bound (as before)
        estimator = Estimator(0.9, recent_size=recent_size)
        estimator.swap(served)
        estimator.apply(records)
        assert estimator.learner.factor("batch", "m", "Alpaca") < 0.5  # answers of 2 tokens: bounds come down
        estimator.swap(ServedModel.load(small_artifact()))  # a new version: its calibrators start again
        factors[recent_size] = estimator.learner.factor("batch", "m", "Alpaca")
    assert factors[500] < 0.5 and factors[0] == 1.0


def test_completions_are_learned_with_the_prompt_length_their_bound_was_served_for() -> None:
    """A chat request's engine count includes its template; serving asked with a guess from the text and
    records it, and both the online learner and the retrain learn with that guess (the features served)."""
    from tempo.estimator.engine import Estimator
    from tempo.estimator.retrain import samples_from_records
    from tempo.models.features import FeatureSpec, PromptSketch, pack_sketch

    spec = FeatureSpec()
    sketch = pack_sketch(PromptSketch.of("say hi", spec), spec)
    served = {"prompt_tokens": 40, "estimate_prompt_tokens": 2, "slo_class": "latency", "output_tokens": 3,
              "finish_reason": "stop", "sketch": sketch}
    older = {k: v for k, v in served.items() if k != "estimate_prompt_tokens"}  # any client's record
    estimator = Estimator(0.9)
    parsed = [estimator.parse(r) for r in (served, older)]
    assert [o.request.prompt_tokens for o in parsed if o is not None] == [2, 40]
    parts = samples_from_records([served, older], spec, fractions=(1.0, 0.0, 0.0))
    assert sorted(r.prompt_tokens for r in parts["fit"].requests) == [2, 40]
