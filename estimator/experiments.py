"""The drift and unseen-model experiments behind the issue's figures (real CASTILLO lengths).

``drift``: bounds are served for one served model's completions, then the stream switches to another
model's lengths under the same name (the deployment changed under us). The served bound is the batch
model's calibrated B0 times the online factor at the time of serving; each completion is scored against
it before the learner sees it (the service's exact path: ``Estimator.estimate`` / ``apply``). Reports
completions until the rolling coverage is back within ``tol`` of the target, with and without the
adaptive calibration; then (with a Store) a retrain on the new completions and its validation figures.

``unseen``: requests of a served model the batch model never saw; ``unseen_apps``: chat requests to a
batch model trained on code apps only. Each compares the batch model alone, with adaptive calibration,
and the River model with calibration: what each part adds.

``python -m tempo.estimator.experiments [--redis-url URL] [--json OUT]`` prints both.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
from tempo.estimator.castillo_stream import DEFAULT_MODEL, DRIFT_MODEL, completion_records, small_artifact
from tempo.estimator.engine import ServedModel
from tempo.models.features import PromptSketch, RequestInfo
from tempo.models.online import Observation, OnlineLengthLearner


def _observations(records: list[dict[str, Any]], served: ServedModel) -> list[Observation]:
    obs = []
    for r in records:
        sketch = PromptSketch.from_dict(r["sketch"], served.model.spec)
        info = RequestInfo(r["prompt_tokens"], r["app"], r["model"], r["slo_class"], sketch=sketch)
        obs.append(Observation(info, sketch, float(r["output_tokens"]), None))
    b0 = served.model.predict_bound([o.request for o in obs])
    for o, b in zip(obs, b0, strict=True):
        o.batch_bound = float(b)
    return obs


def serve_stream(observations: list[Observation], learner: OnlineLengthLearner, batch_knows: bool = True
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(covered, bound, length) per completion: bound served first, then learned from."""
    covered, bounds, lengths = [], [], []
    for o in observations:
        r = o.request
        source = learner.source_for(r, batch_knows)
        raw = learner.river_bound(r, o.sketch) if source == "river" else float(o.batch_bound or 1.0)
        bound = max(1, math.ceil(math.ceil(raw) * learner.factor(source, r.model, r.app)))
        covered.append(o.length <= bound)
        bounds.append(bound)
        lengths.append(o.length)
        learner.learn_one(o)
    return np.asarray(covered), np.asarray(bounds, dtype=float), np.asarray(lengths)


def reserved_per_used(bounds: np.ndarray, lengths: np.ndarray) -> float:
    """Overestimation: tokens reserved by the bounds per token actually generated."""
    return round(float(bounds.sum() / lengths.sum()), 3)


def min_rolling(covered: np.ndarray, start: int, window: int) -> float:
    """Lowest coverage over windows of ``window`` completions ending after ``start``."""
    c = np.concatenate([[0], np.cumsum(covered.astype(float))])
    ends = np.arange(max(start + 1, window), len(covered) + 1)
    return round(float(((c[ends] - c[ends - window]) / window).min()), 4)


def recovery(covered: np.ndarray, start: int, target: float, tol: float, window: int) -> int | None:
    """Completions after ``start`` until the coverage of the last ``window`` (all after ``start``) is within tol."""
    roll: deque[bool] = deque(maxlen=window)
    for t, c in enumerate(covered[start:], start=1):
        roll.append(bool(c))
        if t >= window and abs(sum(roll) / window - target) <= tol:
            return t
    return None


def drift(n_before: int = 1000, n_after: int = 3000, window: int = 200, tol: float = 0.02, seed: int = 0,
          store: Any = None, settings: Any = None, n_estimators: int = 30) -> dict[str, Any]:
    served = ServedModel.load(small_artifact(DEFAULT_MODEL, n_estimators=n_estimators))
    before = list(completion_records(DEFAULT_MODEL, "test", n_before, seed, "before", with_prompt=False))
    after = [{**r, "model": DEFAULT_MODEL}  # same served-model name, another model's lengths
             for r in completion_records(DRIFT_MODEL, "all", n_after, seed + 1, "after", with_prompt=False)]
    obs = _observations(before + after, served)
    out: dict[str, Any] = {"target": 0.9, "window": window, "tol": tol, "before": n_before, "after": n_after,
                           "from": DEFAULT_MODEL, "to_lengths_of": DRIFT_MODEL}
    for name, calibrate in (("adaptive", True), ("static", False)):
        learner = OnlineLengthLearner(quantile=0.9, calibrate=calibrate, use_river=False)
        covered, bounds, lengths = serve_stream(obs, learner)
        post = slice(n_before + n_after // 3, None)
        recovered = recovery(covered, n_before, 0.9, tol, window)
        out[name] = {
            "coverage_before": round(float(covered[:n_before].mean()), 4),
            "coverage_first_100_after": round(float(covered[n_before:n_before + 100].mean()), 4),
            "min_rolling_coverage_after": min_rolling(covered, n_before, window),
            "completions_to_recover": recovered,
            "coverage_after_recovery": (round(float(covered[n_before + recovered:].mean()), 4)
                                        if recovered is not None else None),
            "completions_to_recover_w100": recovery(covered, n_before, 0.9, tol, 100),
            "coverage_last_two_thirds": round(float(covered[post].mean()), 4),
            "reserved_per_used_last_two_thirds": reserved_per_used(bounds[post], lengths[post]),
        }
    if store is not None:
        from tempo.estimator.retrain import retrain

        first = None
        for r in after:
            stream_id = store.append_completion(r)
            first = first or stream_id
        report = retrain(store, settings, since=first, min_samples=500, model_params={"n_estimators": n_estimators})
        out["retrain"] = report.to_dict()
    return out


def unseen(n: int = 3000, warmup: int = 500, seed: int = 0, n_estimators: int = 30) -> dict[str, Any]:
    """Requests of a served model the batch model never saw (labelled as such)."""
    served = ServedModel.load(small_artifact(DEFAULT_MODEL, n_estimators=n_estimators))
    records = list(completion_records(DRIFT_MODEL, "test", n, seed + 2, "unseen", with_prompt=False))
    obs = _observations(records, served)
    out: dict[str, Any] = {"model": DRIFT_MODEL, "n": n, "measured_after": warmup}
    for name, cal, river in (("batch_only", False, False), ("batch+calibration", True, False),
                             ("river+calibration", True, True)):
        learner = OnlineLengthLearner(quantile=0.9, calibrate=cal, use_river=river)
        covered, bounds, lengths = serve_stream(obs, learner, batch_knows=served.knows(obs[0].request))
        out[name] = {"coverage": round(float(covered[warmup:].mean()), 4),
                     "reserved_per_used": reserved_per_used(bounds[warmup:], lengths[warmup:])}
    return out


CODE_APPS = ("Apps", "BigCodeBench", "DS1000", "Mbpp")


def unseen_apps(n: int = 3000, warmup: int = 500, seed: int = 0, n_estimators: int = 30) -> dict[str, Any]:
    """Chat requests (Alpaca, Dolly, ShareGPT) to a batch model trained on code apps only."""
    served = ServedModel.load(small_artifact(DEFAULT_MODEL, n_estimators=n_estimators, apps=CODE_APPS))
    records = [r for r in completion_records(DEFAULT_MODEL, "test", 3 * n, seed + 3, "chat", with_prompt=False)
               if r["app"] not in CODE_APPS][:n]
    obs = _observations(records, served)
    out: dict[str, Any] = {"batch_trained_on": list(CODE_APPS), "n": len(obs), "measured_after": warmup}
    for name, cal, river in (("batch_only", False, False), ("batch+calibration", True, False),
                             ("river+calibration", True, True)):
        learner = OnlineLengthLearner(quantile=0.9, calibrate=cal, use_river=river)
        covered, bounds, lengths = serve_stream(obs, learner, batch_knows=False)  # no chat app was seen
        out[name] = {"coverage": round(float(covered[warmup:].mean()), 4),
                     "reserved_per_used": reserved_per_used(bounds[warmup:], lengths[warmup:])}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--redis-url", help="run the retrain step against this Redis (it writes the stream)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result: dict[str, Any] = {}
    if args.redis_url:
        from tempo.estimator.settings import Settings
        from tempo.estimator.store import Store

        with tempfile.TemporaryDirectory() as tmp:
            settings = Settings(redis_url=args.redis_url, artifacts_dir=Path(tmp))
            store = Store(args.redis_url, timeout_s=5.0)
            from tempo.estimator.retrain import publish

            publish(store, small_artifact(DEFAULT_MODEL), settings.artifacts_dir)
            result["drift"] = drift(store=store, settings=settings)
    else:
        result["drift"] = drift()
    result["unseen"] = unseen()
    result["unseen_apps"] = unseen_apps()
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
