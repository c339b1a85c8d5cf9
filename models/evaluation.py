"""Evaluation of length bounds on held-out prompts, with the baselines, as the eval CLI reports it.

The metric that means something is reserved tokens per used token, sum(bound) / sum(true), at a matched
coverage, with the mean slack in tokens beside it; the mean of bound/true is dominated by 2-10-token
answers and is not reported. Coverage is over samples (each prompt has several sampled lengths).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from tempo.models.calibration import MondrianCalibrator
from tempo.models.features import RequestInfo, app_key
from tempo.models.length_bounds import LengthBoundModel, LengthSamples

FloatArray = npt.NDArray[np.float64]
LADDER_POINTS = (0.5, 0.7)


def pinball_loss(true: FloatArray, bound: FloatArray, quantile: float) -> float:
    diff = true - bound
    return float(np.mean(np.maximum(quantile * diff, (quantile - 1) * diff)))


def bound_metrics(true: FloatArray, bound: FloatArray, apps: Sequence[str], quantile: float) -> dict[str, Any]:
    """Coverage (marginal and per app), reserved per used token, slack, median bound/true, pinball loss."""
    from scipy.stats import kendalltau

    covered = true <= bound
    labels = np.asarray(apps)
    per_app = {
        str(a): {"coverage": round(float(covered[labels == a].mean()), 4), "samples": int((labels == a).sum()),
                 "reserved_per_used": round(float(bound[labels == a].sum() / true[labels == a].sum()), 4)}
        for a in np.unique(labels)
    }
    return {
        "samples": len(true),
        "coverage": round(float(covered.mean()), 4),
        "coverage_by_dataset": per_app,
        "min_dataset_coverage": min(v["coverage"] for v in per_app.values()),
        "reserved_per_used": round(float(bound.sum() / true.sum()), 4),
        "mean_slack_tokens": round(float(np.mean(bound - true)), 1),
        "median_bound_over_true": round(float(np.median(bound / true)), 3),
        "pinball_loss": round(pinball_loss(true, bound, quantile), 2),
        "kendall_tau_bound": round(float(kendalltau(bound, true).statistic), 4),
    }


@dataclass
class LadderPoint:
    """Survivors at k = f x B0: their true lengths, the ladder's bound at k, and B0."""

    true: FloatArray
    bound_k: FloatArray
    b0: FloatArray

    @staticmethod
    def concat(points: Sequence[LadderPoint]) -> LadderPoint:
        return LadderPoint(*(np.concatenate([getattr(p, a) for p in points]) for a in ("true", "bound_k", "b0")))


def ladder_points(model: LengthBoundModel, samples: LengthSamples) -> dict[float, LadderPoint]:
    """Per fraction f in ``LADDER_POINTS``, the samples that survive to k = f x B0 and their bounds."""
    ladders = model.predict_ladders(samples.requests)
    b0 = np.array([ladder.initial for ladder in ladders], dtype=float)[samples.request_index]
    out: dict[float, LadderPoint] = {}
    for f in LADDER_POINTS:
        k = np.floor(f * b0)
        rows = np.flatnonzero(samples.lengths > k)
        bound_k = np.array([ladders[samples.request_index[i]].bound_at(int(k[i])) for i in rows], dtype=float)
        out[f] = LadderPoint(samples.lengths[rows], bound_k, b0[rows])
    return out


def ladder_summary(points: dict[float, LadderPoint]) -> dict[str, Any]:
    """Coverage and slack among survivors, for the ladder and for keeping B0."""
    out: dict[str, Any] = {}
    for f, p in points.items():
        some = len(p.true) > 0
        out[f"k={f}xB0"] = {
            "survivors": len(p.true),
            "coverage_ladder": round(float(np.mean(p.true <= p.bound_k)), 4) if some else None,
            "coverage_keep_b0": round(float(np.mean(p.true <= p.b0)), 4) if some else None,
            "mean_slack_ladder": round(float(np.mean(p.bound_k - p.true)), 1) if some else None,
            "mean_slack_keep_b0": round(float(np.mean(p.b0 - p.true)), 1) if some else None,
        }
    return out


def ladder_metrics(model: LengthBoundModel, samples: LengthSamples) -> dict[str, Any]:
    """Coverage and slack among survivors at k = f x B0, for the ladder and for keeping B0."""
    return ladder_summary(ladder_points(model, samples))


def latency_ms(predict: Callable[[Sequence[RequestInfo]], object], requests: Sequence[RequestInfo],
               batch: int, repeats: int) -> dict[str, float]:
    """p50/p99 wall time of ``predict`` on batches of ``batch`` requests (features included)."""
    rng = np.random.default_rng(0)
    predict(list(requests[:batch]))  # warm-up
    times = []
    for _ in range(repeats):
        chosen = [requests[i] for i in rng.integers(len(requests), size=batch)]
        start = time.perf_counter()
        predict(chosen)
        times.append((time.perf_counter() - start) * 1000)
    return {"p50": round(float(np.percentile(times, 50)), 3), "p99": round(float(np.percentile(times, 99)), 3),
            "repeats": repeats}


# -- baselines ------------------------------------------------------------------------------------

def empirical_quantile_bounds(train: LengthSamples, test: LengthSamples, quantile: float,
                              by_model: bool = False) -> FloatArray:
    """Baseline (a): per-dataset (optionally per dataset and model) empirical quantile, no text."""
    def key(r: RequestInfo) -> str:
        return f"{r.model}|{app_key(r.app)}" if by_model else app_key(r.app)

    keys = np.array([key(train.requests[i]) for i in train.request_index])
    table = {k: float(np.quantile(train.lengths[keys == k], quantile, method="higher")) for k in np.unique(keys)}
    fallback = float(np.quantile(train.lengths, quantile, method="higher"))
    per_request = np.array([table.get(key(r), fallback) for r in test.requests])
    return per_request[test.request_index]


def prompt_length_bounds(fit: LengthSamples, cal: LengthSamples, test: LengthSamples,
                         quantile: float, seed: int = 0) -> FloatArray:
    """Baseline (b): quantile regression on the prompt token count only, split-conformal calibrated."""
    from tempo.models.quantile import LightGBMQuantile

    def x(samples: LengthSamples) -> FloatArray:
        return np.log1p(np.array([[r.prompt_tokens] for r in samples.requests], dtype=float))

    model = LightGBMQuantile(quantile=quantile, n_estimators=200, seed=seed)
    model.fit(x(fit)[fit.request_index], fit.lengths)
    cal_raw = model.predict_quantile(x(cal))[cal.request_index]
    calibrator = MondrianCalibrator(quantile).fit(cal_raw, cal.lengths)
    return np.ceil(calibrator.apply(model.predict_quantile(x(test))))[test.request_index]


def paper_style_model(quantile: float = 0.95, seed: int = 0) -> LengthBoundModel:
    """Baseline (c), the paper's predictor: a quantile forest on prompt text; no calibration, no ladder."""
    return LengthBoundModel(quantile=quantile, kind="qrf", k_draws=0, seed=seed,
                            model_params={"n_estimators": 100, "min_samples_leaf": 5})


@dataclass
class Split:
    fit: LengthSamples
    calibration: LengthSamples
    test: LengthSamples

    def fit_and_calibration(self) -> LengthSamples:
        """fit + calibration samples in one set (for the baselines that need no calibration split)."""
        requests = self.fit.requests + self.calibration.requests
        index = np.concatenate([self.fit.request_index, self.calibration.request_index + len(self.fit.requests)])
        return LengthSamples(requests, index, np.concatenate([self.fit.lengths, self.calibration.lengths]))
