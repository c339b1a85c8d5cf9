"""The conditional length bound U(x, k) and its calibrated ladder.

One quantile model learns the q-quantile of the length L given the request features x *and* that k tokens
are already out (L > k): training rows are (x, k) for k = 0 and for k drawn from a fixed log-uniform
density independently of L, kept when L > k, so the rows at each k are exactly the survivors at k.

For a request, the ladder is ``[(0, B0), (f1 B0, U1), (f2 B0, U2), ...]`` with k at fixed fractions of the
calibrated initial bound B0. Each level is conformally calibrated among the calibration samples that
survive to its k (the level-0 offset per app, Mondrian), so coverage holds among requests that reached k.
Ladders are monotone (bounds non-decreasing, bound_k > k), which the scheduler's BoundLadder checks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt
from tempo.models.calibration import CALIBRATIONS, MondrianCalibrator, rank_quantile, unit_inverse
from tempo.models.features import FeatureSpec, Featurizer, RequestInfo, app_key
from tempo.models.quantile import QuantileModel, make_model
from tempo.scheduler.bounds import BoundLadder, BoundQuery

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

DEFAULT_FRACTIONS = (0.25, 0.5, 0.7, 0.85, 1.0, 1.25, 1.5, 2.0, 3.0)


@dataclass
class LengthSamples:
    """Observed lengths: ``requests`` are unique; ``request_index[i]`` is the request of sample i.

    ``units[r]`` (optional) names request r's exchangeable unit, the prompt: the requests of one prompt
    for several served models share it (CASTILLO's prompt id). Without it, requests with the same
    prompt text (or sketch) share a unit, and a request without either is a unit of its own."""

    requests: list[RequestInfo]
    request_index: IntArray
    lengths: FloatArray
    units: IntArray | None = None

    def __post_init__(self) -> None:
        self.request_index = np.asarray(self.request_index, dtype=np.int64)
        self.lengths = np.asarray(self.lengths, dtype=np.float64)
        if len(self.request_index) != len(self.lengths):
            raise ValueError("request_index and lengths differ in length")
        if len(self.lengths) and (self.lengths.min() < 1 or not np.all(np.isfinite(self.lengths))):
            raise ValueError("lengths must be finite and >= 1")
        if self.units is not None:
            self.units = np.asarray(self.units, dtype=np.int64)
            if len(self.units) != len(self.requests):
                raise ValueError("units must name one unit per request")

    def __len__(self) -> int:
        return len(self.lengths)

    def mean_log_lengths(self) -> FloatArray:
        """Per request, the mean log length of its samples (the text score's target)."""
        totals = np.bincount(self.request_index, np.log(self.lengths), minlength=len(self.requests))
        counts = np.bincount(self.request_index, minlength=len(self.requests))
        return np.where(counts > 0, totals / np.maximum(counts, 1), np.log(np.maximum(self.lengths.mean(), 1)))

    @property
    def sample_apps(self) -> list[str]:
        apps = [app_key(r.app) for r in self.requests]
        return [apps[i] for i in self.request_index]

    @property
    def sample_groups(self) -> list[tuple[str, str]]:
        """Per sample, its calibration group chain: (served model | app, app)."""
        chains = [group_chain(r) for r in self.requests]
        return [chains[i] for i in self.request_index]

    def request_units(self) -> IntArray:
        """Per request, its unit (see the class docstring)."""
        if self.units is not None:
            return self.units
        keys: dict[object, int] = {}
        out = np.empty(len(self.requests), dtype=np.int64)
        for i, r in enumerate(self.requests):
            if r.prompt is not None:
                key: object = ("text", r.prompt)
            elif r.sketch is not None:
                key = ("sketch", r.sketch.n_chars, np.asarray(r.sketch.indices, dtype=np.int64).tobytes())
            else:
                key = ("request", i)
            out[i] = keys.setdefault(key, len(keys))
        return out

    @property
    def sample_units(self) -> IntArray:
        """Per sample, its unit: the prompt, the exchangeable unit of conformal calibration."""
        return self.request_units()[self.request_index]

    def subset(self, sample_rows: npt.NDArray[np.int64]) -> LengthSamples:
        """The samples at ``sample_rows`` (requests kept whole, so indices stay valid)."""
        return LengthSamples(self.requests, self.request_index[sample_rows], self.lengths[sample_rows], self.units)


def group_chain(request: RequestInfo) -> tuple[str, str]:
    """Mondrian calibration groups of a request, most specific first: (model|app, app)."""
    app = app_key(request.app)
    return (f"{request.model or '-'}|{app}", app)


def with_k(X: FloatArray, k: FloatArray) -> FloatArray:
    """Request features plus the conditioning feature log1p(k)."""
    return np.hstack([X, np.log1p(np.asarray(k, dtype=float))[:, None]])


def augment(
    X: FloatArray, samples: LengthSamples, k_draws: int, k_max: float, rng: np.random.Generator
) -> tuple[FloatArray, FloatArray]:
    """Training rows (x, k) -> L for k = 0 and ``k_draws`` log-uniform k per sample, kept while L > k."""
    n = len(samples)
    ks = [np.zeros(n)]
    idx = [np.arange(n)]
    for _ in range(k_draws):
        k = np.floor(np.exp(rng.uniform(np.log(4.0), np.log(k_max), n)))
        alive = samples.lengths > k
        ks.append(k[alive])
        idx.append(np.flatnonzero(alive))
    rows = np.concatenate(idx)
    return with_k(X[samples.request_index[rows]], np.concatenate(ks)), samples.lengths[rows]


@dataclass
class LadderCalibration:
    """Level 0 per app (Mondrian); each further level one pooled offset among survivors."""

    level0: MondrianCalibrator
    fractions: tuple[float, ...]
    offsets: list[float]  # one per fraction, log scale
    survivors: list[int]  # calibration samples behind each offset
    effective: list[float] = field(default_factory=list)  # effective prompts behind each offset (#14)

    def to_dict(self) -> dict[str, Any]:
        return {"level0": self.level0.to_dict(), "fractions": list(self.fractions),
                "offsets": self.offsets, "survivors": self.survivors, "effective": self.effective}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LadderCalibration:
        return cls(MondrianCalibrator.from_dict(data["level0"]), tuple(data["fractions"]),
                   list(data["offsets"]), list(data["survivors"]), list(data.get("effective", [])))


@dataclass
class LengthBoundModel:
    """Calibrated conditional upper bounds on response length. Also a scheduler ``BoundProvider``."""

    quantile: float = 0.9
    kind: str = "lightgbm"
    spec: FeatureSpec = field(default_factory=FeatureSpec)
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS
    k_draws: int = 4
    k_max: float = 4096.0
    coverage_margin: float = 0.005  # calibrate to q + margin (a floor under the prompt ranks' correction)
    min_survivors: int = 100  # a ladder level needs this many calibration survivors
    calibration: str = "shrink"  # a key of calibration.CALIBRATIONS: the rank and the small-group rule
    seed: int = 0
    model_params: dict[str, Any] = field(default_factory=dict)
    featurizer_: Featurizer | None = None
    model_: QuantileModel | None = None
    calibration_: LadderCalibration | None = None

    # -- training -------------------------------------------------------------------------------
    def fit(self, samples: LengthSamples) -> LengthBoundModel:
        """Fit the featurizer's projection and the conditional quantile model (not yet calibrated)."""
        rng = np.random.default_rng(self.seed)
        if not self.spec.apps and not self.spec.models:  # one-hot vocabularies of the training metadata
            self.spec = replace(
                self.spec,
                apps=tuple(sorted({app_key(r.app) for r in samples.requests})),
                models=tuple(sorted({r.model for r in samples.requests if r.model})),
            )
        self.featurizer_ = Featurizer(self.spec)
        X = self.featurizer_.fit_transform(samples.requests, samples.mean_log_lengths(), seed=self.seed)
        X_aug, y_aug = augment(X, samples, self.k_draws, self.k_max, rng)
        self.model_ = make_model(self.kind, self.quantile, **self.model_params).fit(X_aug, y_aug)
        self.calibration_ = None
        return self

    def calibrate(self, samples: LengthSamples, groups_by_app: bool = True) -> LengthBoundModel:
        """Split-conformal offsets from samples whose prompts were not used in ``fit``.

        Level 0 per (served model | app, app) group, Mondrian, with the rank and the small-group rule of
        ``self.calibration``; each ladder level one pooled offset among the samples that survive to its k,
        ranked the same way (over effective prompts by default: a prompt's samples are one unit)."""
        model, X = self._model(), self._features(samples.requests)
        target = min(self.quantile + self.coverage_margin, 0.999)
        rank, shrinkage = _method(self.calibration)
        raw0 = model.predict_quantile(with_k(X, np.zeros(len(X))))[samples.request_index]
        groups = samples.sample_groups if groups_by_app else None
        units = samples.sample_units
        margin = target - self.quantile
        level0 = MondrianCalibrator(target, margin=margin, rank=rank, shrinkage=shrinkage)
        level0.fit(raw0, samples.lengths, groups, units)
        b0 = self._b0(X, samples.requests, level0)[samples.request_index]
        inverse = unit_inverse(units, len(units))
        offsets, survivors, effective = [], [], []
        for f in self.fractions:
            k = np.floor(f * b0)
            alive = samples.lengths > k
            if alive.sum() < self.min_survivors:
                break
            rows = np.flatnonzero(alive)
            raw = model.predict_quantile(with_k(X[samples.request_index[rows]], k[rows]))
            scores = np.log(samples.lengths[rows]) - np.log(raw)
            base, floor = (target, 0.0) if rank == "sample" else (self.quantile, margin)
            value, n_eff = rank_quantile(scores, base, unit_inverse(inverse[rows], len(rows)), rank, margin=floor)
            offsets.append(value if math.isfinite(value) else float(scores.max()))
            survivors.append(int(alive.sum()))
            effective.append(round(n_eff, 1))
        self.calibration_ = LadderCalibration(level0, self.fractions[: len(offsets)], offsets, survivors, effective)
        return self

    def recalibrated(self, samples: LengthSamples) -> LengthBoundModel:
        """A copy recalibrated on a few completions of a new served model (or a drifted one).

        Level 0 is calibrated afresh on ``samples`` with the same rank and small-group rule as the
        calibration it replaces: per (served model | app, app) group, each shrunk toward the pooled offset
        of ``samples`` (with the hard fallback of a calibration from before issue #14, a few hundred
        completions give one pooled offset, as they did then). The ladder's levels keep their shape and
        move by the change of the pooled offset, since an under-predicting model is off by a similar
        factor at every k.
        """
        if self.calibration_ is None:
            raise RuntimeError("calibrate the model first")
        base = self.calibration_.level0
        model, X = self._model(), self._features(samples.requests)
        raw0 = model.predict_quantile(with_k(X, np.zeros(len(X))))[samples.request_index]
        level0 = MondrianCalibrator(base.quantile, margin=base.margin, min_group=base.min_group, rank=base.rank,
                                    shrinkage=base.shrinkage)
        level0.fit(raw0, samples.lengths, samples.sample_groups, samples.sample_units)
        delta = level0.pooled_ - base.pooled_
        copy = replace(self)
        copy.calibration_ = LadderCalibration(
            level0, self.calibration_.fractions, [o + delta for o in self.calibration_.offsets],
            list(self.calibration_.survivors), list(self.calibration_.effective),
        )
        return copy

    def with_calibration(self, calibration: str, coverage_margin: float | None = None) -> LengthBoundModel:
        """A copy of this fitted model that will calibrate with another method (``calibrate`` it next)."""
        _method(calibration)
        margin = self.coverage_margin if coverage_margin is None else coverage_margin
        return replace(self, calibration=calibration, coverage_margin=margin, calibration_=None)

    # -- prediction ------------------------------------------------------------------------------
    def _model(self) -> QuantileModel:
        if self.model_ is None or self.featurizer_ is None:
            raise RuntimeError("LengthBoundModel is not fitted")
        return self.model_

    def _features(self, requests: Sequence[RequestInfo]) -> FloatArray:
        assert self.featurizer_ is not None
        return self.featurizer_.transform(requests)

    def _b0(self, X: FloatArray, requests: Sequence[RequestInfo], level0: MondrianCalibrator) -> FloatArray:
        raw = self._model().predict_quantile(with_k(X, np.zeros(len(X))))
        return np.ceil(level0.apply(raw, [group_chain(r) for r in requests]))

    def predict_bound(self, requests: Sequence[RequestInfo]) -> FloatArray:
        """Calibrated initial bound B0 per request (the raw model bound when not calibrated)."""
        X = self._features(requests)
        if self.calibration_ is None:
            return np.ceil(self._model().predict_quantile(with_k(X, np.zeros(len(X)))))
        return self._b0(X, requests, self.calibration_.level0)

    def predict_ladders(self, requests: Sequence[RequestInfo]) -> list[BoundLadder]:
        """One ladder per request; one batched model call per ladder level set."""
        if not requests:
            return []
        X = self._features(requests)
        cal = self.calibration_
        model = self._model()
        if cal is None:
            b0 = np.ceil(model.predict_quantile(with_k(X, np.zeros(len(X)))))
            return [BoundLadder.fixed(int(b), self.quantile) for b in b0]
        b0 = self._b0(X, requests, cal.level0)
        n, levels = len(requests), len(cal.fractions)
        ks = np.floor(np.outer(b0, cal.fractions)) if levels else np.zeros((n, 0))
        if levels:
            raw = model.predict_quantile(with_k(np.repeat(X, levels, axis=0), ks.reshape(-1))).reshape(n, levels)
            bounds = np.ceil(raw * np.exp(np.asarray(cal.offsets))[None, :])
        else:
            bounds = np.zeros((n, 0))
        return [_monotone_ladder(int(b0[i]), ks[i], bounds[i], self.quantile) for i in range(n)]

    def ladders(self, queries: Sequence[BoundQuery]) -> list[BoundLadder]:
        """The scheduler's BoundProvider interface."""
        return self.predict_ladders([
            RequestInfo(q.prompt_tokens, q.app, q.model, q.slo_class.value, prompt=q.prompt) for q in queries
        ])


def _method(name: str) -> tuple[str, float | None]:
    if name not in CALIBRATIONS:
        raise ValueError(f"unknown calibration {name!r} (known: {', '.join(CALIBRATIONS)})")
    return CALIBRATIONS[name]


def _monotone_ladder(b0: int, ks: FloatArray, bounds: FloatArray, quantile: float) -> BoundLadder:
    """Steps with increasing k, bounds non-decreasing and above k (the conditional quantile is monotone)."""
    steps = [(0, max(1, b0))]
    for k, bound in zip(ks.astype(int).tolist(), bounds.astype(int).tolist(), strict=True):  # Python ints
        if k <= steps[-1][0]:
            continue
        steps.append((int(k), int(max(bound, steps[-1][1], k + 1))))
    return BoundLadder(tuple(steps), quantile)
