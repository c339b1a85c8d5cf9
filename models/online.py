"""Online learning of length bounds from completed requests (pure ML: no Redis, no web).

Two learners, both updated from every completion, in River's ``learn_one`` / ``predict_one`` style:

- ``AdaptiveCalibrator``: an online conformal offset on the log bound, per (source, served model, app).
  Each completion is scored against the offset it would have been served with *before* the calibrator
  learns from it (as River's ``conf.RegressionJackknife`` does), then the offset moves by quantile
  tracking (the "P" of conformal PID control, Angelopoulos et al. 2023; ACI in log space):
  ``offset += lr * scale * (miss - (1 - q))``. Misses push it up by ``q``, hits pull it down by ``1 - q``,
  so the long-run miss rate is ``1 - q`` whatever the drift; ``scale`` (an EW mean absolute deviation of
  the scores) makes the step size unit-free.
- ``OnlineQuantileModel``: River's ``LinearRegression`` with the pinball (quantile) loss on log length,
  over the prompt sketch's hashed n-grams plus metadata. It carries served models and apps the batch
  model has never seen, until a retrain gives the batch model data for them.

``OnlineLengthLearner`` composes them; its whole state is JSON (``to_dict`` / ``from_dict``, no pickle),
so a worker can checkpoint it atomically with the acknowledgement of the records it contains.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> cal = AdaptiveCalibrator(quantile=0.9)
>>> covered = []
>>> for t in range(4000):                      # raw bound 100; lengths jump x2 halfway
...     length = rng.lognormal(np.log(60 if t < 2000 else 120), 0.4)
...     covered.append(cal.learn_one(100.0, length))
>>> bool(abs(np.mean(covered[-1000:]) - 0.9) < 0.03)
True
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tempo.models.features import PromptSketch, RequestInfo, app_key

ANY = "*"


@dataclass
class AdaptiveCalibrator:
    """Online conformal log-offset for one group of requests; ``factor()`` multiplies the raw bound."""

    quantile: float = 0.9
    lr: float = 0.15  # step in units of the score scale
    scale_decay: float = 0.02  # EW weight of a new |score - offset| in the scale
    min_scale: float = 0.05
    window: int = 500  # recent completions kept for rolling coverage / overestimation
    offset_: float = 0.0
    scale_: float = 0.5
    n_: int = 0
    recent_: deque[tuple[bool, float]] = field(default_factory=deque)  # (covered, bound / length)

    def factor(self) -> float:
        return math.exp(self.offset_)

    def learn_one(self, raw_bound: float, length: float) -> bool:
        """Score ``length`` against the bound served now, then update; returns whether it was covered."""
        raw_bound, length = max(float(raw_bound), 1.0), max(float(length), 1.0)
        score = math.log(length) - math.log(raw_bound)
        bound = raw_bound * math.exp(self.offset_)
        covered = length <= math.ceil(bound)
        miss = 0.0 if covered else 1.0
        self.scale_ += self.scale_decay * (abs(score - self.offset_) - self.scale_)
        step = self.lr * max(self.scale_, self.min_scale)
        self.offset_ += step * (miss - (1.0 - self.quantile))
        self.n_ += 1
        self.recent_.append((covered, math.ceil(bound) / length))
        while len(self.recent_) > self.window:
            self.recent_.popleft()
        return covered

    def rolling_coverage(self) -> float:
        return sum(c for c, _ in self.recent_) / len(self.recent_) if self.recent_ else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {"quantile": self.quantile, "lr": self.lr, "scale_decay": self.scale_decay,
                "min_scale": self.min_scale, "window": self.window, "offset": self.offset_,
                "scale": self.scale_, "n": self.n_, "recent": [[c, r] for c, r in self.recent_]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdaptiveCalibrator:
        return cls(quantile=float(data["quantile"]), lr=float(data["lr"]), scale_decay=float(data["scale_decay"]),
                   min_scale=float(data["min_scale"]), window=int(data["window"]), offset_=float(data["offset"]),
                   scale_=float(data["scale"]), n_=int(data["n"]),
                   recent_=deque((bool(c), float(r)) for c, r in data["recent"]))


def sketch_features(request: RequestInfo, sketch: PromptSketch) -> dict[str, float]:
    """River features: the sketch's hashed n-grams, size features and one-hot metadata."""
    x = {f"h{int(i)}": float(w) for i, w in zip(sketch.indices, sketch.weights, strict=True)}
    x["log_prompt_tokens"] = math.log1p(max(request.prompt_tokens, 0)) / 8.0
    x["log_chars"] = math.log1p(sketch.n_chars) / 10.0
    x[f"app={app_key(request.app)}"] = 1.0
    x[f"model={request.model or ANY}"] = 1.0
    x[f"class={request.slo_class or ANY}"] = 1.0
    return x


class OnlineQuantileModel:
    """River linear quantile regression of log length on hashed prompt features (cold start: a prior)."""

    def __init__(self, quantile: float = 0.9, lr: float = 0.02, intercept_lr: float = 0.05,
                 prior_length: float = 512.0, l2: float = 0.0) -> None:
        self.quantile = quantile
        self.lr = lr
        self.intercept_lr = intercept_lr
        self.prior_length = prior_length
        self.l2 = l2
        self.model_ = self._new_model(math.log(prior_length))

    def _new_model(self, intercept: float) -> Any:
        from river import linear_model, optim

        return linear_model.LinearRegression(
            optimizer=optim.SGD(self.lr), loss=optim.losses.Quantile(self.quantile), l2=self.l2,
            intercept_init=intercept, intercept_lr=self.intercept_lr,
        )

    def predict_one(self, x: dict[str, float]) -> float:
        """The q-quantile bound on the length (tokens, >= 1)."""
        return math.exp(min(max(float(self.model_.predict_one(x)), 0.0), 12.0))

    def learn_one(self, x: dict[str, float], length: float) -> None:
        self.model_.learn_one(x, math.log(max(length, 1.0)))

    def to_dict(self) -> dict[str, Any]:
        return {"quantile": self.quantile, "lr": self.lr, "intercept_lr": self.intercept_lr,
                "prior_length": self.prior_length, "l2": self.l2, "intercept": float(self.model_.intercept),
                "weights": {k: float(v) for k, v in self.model_._weights.items()},
                "iterations": int(self.model_.optimizer.n_iterations)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OnlineQuantileModel:
        from river import utils

        out = cls(float(data["quantile"]), float(data["lr"]), float(data["intercept_lr"]),
                  float(data["prior_length"]), float(data["l2"]))
        out.model_ = out._new_model(float(data["intercept"]))
        out.model_.intercept = float(data["intercept"])
        out.model_._weights = utils.VectorDict({str(k): float(v) for k, v in data["weights"].items()})
        out.model_.optimizer.n_iterations = int(data["iterations"])
        return out


def _key(source: str, model: str | None, app: str | None) -> str:
    return f"{source}|{model or ANY}|{app_key(app) if app is not None else ANY}"


@dataclass
class Observation:
    """One completion as the learner sees it; ``batch_bound`` is the batch model's raw B0 (None if none)."""

    request: RequestInfo
    sketch: PromptSketch
    length: float
    batch_bound: float | None


@dataclass
class OnlineLengthLearner:
    """Adaptive calibration of the batch model, plus a River model for what the batch model has not seen.

    Serving asks ``source_for`` which model answers a request (``"batch"`` or ``"river"``), takes that
    model's raw ladder and multiplies it by ``factor(source, model, app)``. Calibrators are hierarchical:
    (model, app) once it has ``min_obs`` completions, else (model, any app), else (any, any).
    """

    quantile: float = 0.9
    min_obs: int = 30  # completions a calibrator needs before it is used
    river_min_obs: int = 100  # completions of a (model, app) before the River model serves it
    calibrate: bool = True  # False: the ablation without adaptive calibration
    use_river: bool = True  # False: the ablation without the River model
    calibrator_params: dict[str, Any] = field(default_factory=dict)
    river_params: dict[str, Any] = field(default_factory=dict)
    calibrators_: dict[str, AdaptiveCalibrator] = field(default_factory=dict)
    river_: OnlineQuantileModel | None = None
    counts_: dict[str, int] = field(default_factory=dict)  # completions per (model, app)
    n_applied_: int = 0

    def __post_init__(self) -> None:
        if self.river_ is None:
            self.river_ = OnlineQuantileModel(self.quantile, **self.river_params)

    # -- serving ---------------------------------------------------------------------------------
    def source_for(self, request: RequestInfo, batch_knows: bool) -> str:
        """``"batch"`` when the batch model knows the request's model and app (or River is not ready)."""
        if batch_knows or not self.use_river:
            return "batch"
        return "river" if self.counts_.get(_key("n", request.model, request.app), 0) >= self.river_min_obs else "batch"

    def river_bound(self, request: RequestInfo, sketch: PromptSketch) -> float:
        assert self.river_ is not None
        return self.river_.predict_one(sketch_features(request, sketch))

    def _calibrator_chain(self, source: str, model: str | None, app: str | None) -> list[str]:
        return [_key(source, model, app), _key(source, model, None), _key(source, None, None)]

    def factor(self, source: str, model: str | None, app: str | None) -> float:
        """Multiplier for the raw bound of ``source`` (1.0 until a calibrator has ``min_obs`` completions)."""
        if not self.calibrate:
            return 1.0
        for key in self._calibrator_chain(source, model, app):
            cal = self.calibrators_.get(key)
            if cal is not None and cal.n_ >= self.min_obs:
                return cal.factor()
        return 1.0

    # -- learning --------------------------------------------------------------------------------
    def learn_one(self, obs: Observation) -> None:
        """Update every calibrator on the chain (each scored before it learns) and the River model."""
        request = obs.request
        assert self.river_ is not None
        x = sketch_features(request, obs.sketch)
        raw = {"river": self.river_.predict_one(x)}  # scored before the River model learns
        if obs.batch_bound is not None:
            raw["batch"] = obs.batch_bound
        for source, bound in raw.items():
            self._learn_calibrators(source, request, bound, obs.length)
        self.river_.learn_one(x, obs.length)
        count_key = _key("n", request.model, request.app)
        self.counts_[count_key] = self.counts_.get(count_key, 0) + 1
        self.n_applied_ += 1

    def _learn_calibrators(self, source: str, request: RequestInfo, raw_bound: float, length: float) -> None:
        for key in self._calibrator_chain(source, request.model, request.app):
            cal = self.calibrators_.get(key)
            if cal is None:
                cal = self.calibrators_[key] = AdaptiveCalibrator(self.quantile, **self.calibrator_params)
            cal.learn_one(raw_bound, length)

    def calibrate_source(self, source: str, observations: Sequence[Observation], raw_bounds: Sequence[float]) -> None:
        """Learn only ``source``'s calibrators from past completions scored with its raw bounds now: a batch
        model swapped in starts calibrated on the recent completions instead of from its raw bound."""
        for obs, bound in zip(observations, raw_bounds, strict=True):
            self._learn_calibrators(source, obs.request, bound, obs.length)

    def reset_source(self, source: str) -> None:
        """Forget the calibrators of one source (a new batch model comes with its own calibration)."""
        self.calibrators_ = {k: c for k, c in self.calibrators_.items() if not k.startswith(f"{source}|")}

    def learn_many(self, observations: Sequence[Observation]) -> None:
        for obs in observations:
            self.learn_one(obs)

    # -- state -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        assert self.river_ is not None
        return {"quantile": self.quantile, "min_obs": self.min_obs, "river_min_obs": self.river_min_obs,
                "calibrate": self.calibrate, "use_river": self.use_river,
                "calibrator_params": self.calibrator_params, "river_params": self.river_params,
                "calibrators": {k: c.to_dict() for k, c in self.calibrators_.items()},
                "river": self.river_.to_dict(), "counts": self.counts_, "n_applied": self.n_applied_}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OnlineLengthLearner:
        return cls(quantile=float(data["quantile"]), min_obs=int(data["min_obs"]),
                   river_min_obs=int(data["river_min_obs"]), calibrate=bool(data["calibrate"]),
                   use_river=bool(data["use_river"]), calibrator_params=dict(data["calibrator_params"]),
                   river_params=dict(data["river_params"]),
                   calibrators_={k: AdaptiveCalibrator.from_dict(v) for k, v in data["calibrators"].items()},
                   river_=OnlineQuantileModel.from_dict(data["river"]),
                   counts_={k: int(v) for k, v in data["counts"].items()}, n_applied_=int(data["n_applied"]))


__all__ = ["AdaptiveCalibrator", "Observation", "OnlineLengthLearner", "OnlineQuantileModel", "sketch_features"]
