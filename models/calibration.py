"""Split-conformal calibration of upper bounds (CQR with multiplicative scores), Mondrian by group.

The score of a calibration sample is ``log(true) - log(raw bound)``; the bound is then multiplied by
``exp(the conformal quantile of the scores)``. With n exchangeable scores, taking the ceil((n+1)q)-th
smallest guarantees coverage >= q on a new sample.

Length data breaks the "n exchangeable scores" premise: a prompt comes with several sampled lengths
(CASTILLO: 10 per prompt and served model, and the same prompt for every served model), and what is
exchangeable is the prompt, not the sample. Ten correlated samples of one prompt are worth far fewer
than ten independent ones, so a rank taken over samples makes the offset too small exactly where the
groups are small (issue #14). Three ranks are offered (``rank``):

- ``"sample"``: the rank over samples, as if all were independent (the calibration before issue #14);
- ``"prompt"``: the finite-sample correction of one whole prompt, ``q (1 + 1/n)`` with n the prompts
  (conservative: a prompt's samples do vary, so a prompt is worth more than one sample);
- ``"effective"`` (default): the correction of the *effective number of prompts* ``n_eff``, the number
  of independent samples the scores are worth given how alike a prompt's samples are (the design effect
  of cluster sampling, ``N / (1 + (m - 1) rho)`` with rho the intra-prompt correlation of the scores):
  between the number of prompts and the number of samples. The offset is the sample quantile at level
  ``q (1 + 1 / n_eff)``, the ceil((n+1)q)-th of n independent scores in the same proportion.

Small Mondrian groups are shrunk toward their parent (``shrinkage`` = kappa, in effective prompts):
``offset = w * own + (1 - w) * parent`` with ``w = n_eff / (n_eff + kappa)``, from the pooled offset
down the chain (app, then served model | app); the own offset is then taken at level
``q (1 + 1 / (n_eff + kappa))``, the parent lending kappa prompts' worth of information. No group is
cut off at a hard threshold (with ``shrinkage=None`` a group needs ``min_group`` samples for an offset
of its own and falls back to the next group in its chain otherwise, as before issue #14). The effective
prompts and the weight of every group are kept (``summary()``) and written to the artifact.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> raw = np.full(5000, 100.0)                       # a model that always says 100
>>> true = rng.lognormal(np.log(100), 0.5, 5000)      # ... for lengths around 100
>>> cal = MondrianCalibrator(0.9).fit(raw[:4000], true[:4000])
>>> bound = cal.apply(raw[4000:])
>>> bool(0.88 <= np.mean(true[4000:] <= bound) <= 0.93)
True
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
GroupKeys = str | tuple[str, ...]  # one key, or a chain from the most specific group to the least
RANKS = ("sample", "prompt", "effective")
DEFAULT_SHRINKAGE = 5.0  # kappa: a group's own offset gets weight n_eff / (n_eff + kappa)
# name -> (rank, shrinkage kappa or None for the hard fallback)
CALIBRATIONS: dict[str, tuple[str, float | None]] = {
    "shrink": ("effective", DEFAULT_SHRINKAGE),  # the default since issue #14
    "effective": ("effective", None),  # the effective-prompt rank, hard fallback
    "prompt": ("prompt", None),  # every prompt one unit, hard fallback
    "sample": ("sample", None),  # the calibration before issue #14
}


def conformal_quantile(scores: FloatArray, quantile: float) -> float:
    """The ceil((n+1)q)-th smallest score (finite-sample valid); +inf when n is too small for q."""
    n = len(scores)
    if n == 0:
        return math.inf
    rank = math.ceil((n + 1) * quantile)
    if rank > n:
        return math.inf
    return float(np.partition(scores, rank - 1)[rank - 1])


def unit_inverse(units: Sequence[Hashable] | npt.NDArray[Any] | None, n: int) -> npt.NDArray[np.int64]:
    """Per sample, the index of its unit (prompt) in 0..U-1; every sample its own unit when ``units`` is None."""
    if units is None:
        return np.arange(n, dtype=np.int64)
    array = np.asarray(units)
    if len(array) != n:
        raise ValueError(f"units has {len(array)} entries for {n} scores")
    _, inverse = np.unique(array, return_inverse=True)
    return inverse.astype(np.int64).reshape(-1)


def effective_count(scores: FloatArray, units: npt.NDArray[np.int64]) -> float:
    """The number of independent samples ``scores`` are worth, given that samples of one unit (prompt)
    are alike: ``N / (1 + (m - 1) rho)`` (the design effect of cluster sampling), with ``m`` the
    size-weighted mean number of samples per unit and ``rho`` the intra-unit correlation of the scores
    (one-way ANOVA on their normal scores, so one extreme sample does not decide it). Between Kish's
    effective number of units (``rho = 1``: a prompt's samples all alike) and N (``rho = 0``).
    ``units``: from ``unit_inverse``."""
    scores = np.asarray(scores, dtype=float)
    n = len(scores)
    if n == 0:
        return 0.0
    sizes_all = np.bincount(units).astype(float)
    sizes = sizes_all[sizes_all > 0]
    kish = float(sizes.sum() ** 2 / np.sum(sizes**2))
    groups = len(sizes)
    if groups < 2 or groups == n:
        return kish if groups < 2 else float(n)
    z = _normal_scores(scores)
    unit_mean = np.bincount(units, z) / np.maximum(sizes_all, 1)
    between = float(np.sum(sizes * (unit_mean[sizes_all > 0] - z.mean()) ** 2)) / (groups - 1)
    within = float(np.sum((z - unit_mean[units]) ** 2)) / (n - groups)
    m0 = (n - np.sum(sizes**2) / n) / (groups - 1)  # the ANOVA's mean unit size for unequal sizes
    denominator = between + (m0 - 1) * within
    rho = min(max((between - within) / denominator, 0.0), 1.0) if denominator > 0 else 1.0
    m_bar = float(np.sum(sizes**2) / n)
    return float(np.clip(n / (1 + (m_bar - 1) * rho), min(kish, n), n))


def _normal_scores(values: FloatArray) -> FloatArray:
    """Ranks mapped to standard normal quantiles (ties share their mean rank)."""
    from scipy.special import ndtri
    from scipy.stats import rankdata

    return np.asarray(ndtri((rankdata(values) - 0.5) / len(values)), dtype=float)


def unit_count(units: npt.NDArray[np.int64]) -> float:
    """Kish's effective number of units: the number of units when they are of one size."""
    if not len(units):
        return 0.0
    sizes = np.bincount(units).astype(float)
    sizes = sizes[sizes > 0]
    return float(sizes.sum() ** 2 / np.sum(sizes**2))


def rank_quantile(scores: FloatArray, quantile: float, units: npt.NDArray[np.int64] | None = None,
                  rank: str = "effective", pseudo: float = 0.0, margin: float = 0.0) -> tuple[float, float]:
    """The finite-sample q-offset of ``scores`` and the effective count n behind it.

    ``rank="sample"``: ``conformal_quantile`` at q + margin, n = the number of samples. Otherwise the
    sample quantile at level ``max(q + margin, q (1 + 1 / (n + pseudo)))``, the finite-sample correction
    of n independent scores (the margin a floor), with n the prompts (``"prompt"``, Kish's count) or the
    effective prompts (``"effective"``, ``effective_count``); ``pseudo``: prompts' worth of information
    from elsewhere (a shrinkage prior). +inf when the level reaches 1 (n too small for q)."""
    if rank not in RANKS:
        raise ValueError(f"rank must be one of {RANKS}, got {rank!r}")
    scores = np.asarray(scores, dtype=float)
    total = len(scores)
    if total == 0:
        return math.inf, 0.0
    if rank == "sample":
        return conformal_quantile(scores, quantile + margin), float(total)
    inverse = np.arange(total, dtype=np.int64) if units is None else units
    n_eff = effective_count(scores, inverse) if rank == "effective" else unit_count(inverse)
    level = max(quantile + margin, quantile * (1 + 1 / (n_eff + pseudo)))
    position = math.ceil(level * total - 1e-9)
    if position > total:
        return math.inf, n_eff
    return float(np.partition(scores, position - 1)[position - 1]), n_eff


@dataclass
class MondrianCalibrator:
    """Log-offsets per group plus a pooled one; ``fit`` on calibration data, ``apply`` to raw bounds.

    ``quantile``: the calibration target, q + ``margin``; the ranks over prompts calibrate to
    ``max(q + margin, q (1 + 1/n))``. ``rank``: see the module docstring. ``shrinkage``: kappa of the
    shrinkage toward the parent group (None: the hard fallback of groups with fewer than ``min_group``
    samples). Loaded from a manifest written before issue #14 (no ``rank``), it is the sample-rank,
    hard-fallback calibrator it was."""

    quantile: float
    margin: float = 0.0  # part of ``quantile`` that is a coverage margin (a floor for the prompt ranks)
    min_group: int = 300  # shrinkage None: samples a group needs for an offset of its own
    rank: str = "effective"
    shrinkage: float | None = DEFAULT_SHRINKAGE
    pooled_: float = 0.0
    by_group_: dict[str, float] = field(default_factory=dict)
    counts_: dict[str, int] = field(default_factory=dict)  # calibration samples per group
    units_: dict[str, int] = field(default_factory=dict)  # distinct prompts per group
    effective_: dict[str, float] = field(default_factory=dict)  # effective prompts behind each offset
    weights_: dict[str, float] = field(default_factory=dict)  # the own offset's weight (1: no shrinkage)
    pooled_effective_: float = 0.0

    def __post_init__(self) -> None:
        if self.rank not in RANKS:
            raise ValueError(f"rank must be one of {RANKS}, got {self.rank!r}")
        if self.shrinkage is not None and self.shrinkage < 0:
            raise ValueError("shrinkage must be >= 0 or None")

    def fit(self, raw: FloatArray, true: FloatArray, groups: Sequence[GroupKeys] | None = None,
            units: Sequence[Hashable] | npt.NDArray[Any] | None = None) -> MondrianCalibrator:
        """``groups[i]`` is sample i's chain of group keys, most specific first (e.g. ("model|app", "app"));
        ``units[i]`` its exchangeable unit (the prompt; default: every sample its own)."""
        scores = np.log(np.asarray(true, dtype=float)) - np.log(np.asarray(raw, dtype=float))
        inverse = unit_inverse(units, len(scores))
        # the rank over samples calibrates to the target itself (bit for bit as before issue #14)
        base, margin = (self.quantile, 0.0) if self.rank == "sample" else (self.quantile - self.margin, self.margin)
        value, self.pooled_effective_ = rank_quantile(scores, base, inverse, self.rank, margin=margin)
        self.pooled_ = _finite(value, scores)
        self.by_group_, self.counts_, self.units_, self.effective_, self.weights_ = {}, {}, {}, {}, {}
        if groups is None:
            return self
        members: dict[str, list[int]] = {}
        parents: dict[str, str | None] = {}
        for i, chain in enumerate(groups):
            keys = _chain(chain)
            for position, key in enumerate(keys):
                members.setdefault(key, []).append(i)
                parents.setdefault(key, keys[position + 1] if position + 1 < len(keys) else None)
        for key in _from_the_root(parents):
            rows = np.asarray(members[key])
            parent = parents[key]
            parent_value = self.by_group_.get(parent, self.pooled_) if parent is not None else self.pooled_
            parent_rows = len(members[parent]) if parent is not None else len(scores)
            pseudo = self.shrinkage or 0.0  # the parent's prompts lend information (and a smaller correction)
            value, n_eff = rank_quantile(scores[rows], base, inverse[rows], self.rank, pseudo, margin)
            self.counts_[key] = len(rows)
            self.units_[key] = len(np.unique(inverse[rows]))
            self.effective_[key] = round(n_eff, 1)
            if self.shrinkage is None:  # hard fallback: an offset of its own only from min_group samples
                if len(rows) >= self.min_group:
                    self.by_group_[key] = _finite(value, scores[rows])
                    self.weights_[key] = 1.0
                continue
            if len(rows) == parent_rows:  # the same samples as its parent: nothing of its own to add
                weight = 0.0
            else:
                weight = n_eff / (n_eff + self.shrinkage) if n_eff + self.shrinkage > 0 else 0.0
            own = _finite(value, scores[rows])
            self.by_group_[key] = weight * own + (1 - weight) * parent_value
            self.weights_[key] = round(weight, 4)
        return self

    def offset(self, chain: GroupKeys | None) -> float:
        """The offset of the most specific group in ``chain`` that has one, else the pooled one."""
        for key in _chain(chain):
            if key in self.by_group_:
                return self.by_group_[key]
        return self.pooled_

    def apply(self, raw: FloatArray, groups: Sequence[GroupKeys | None] | None = None) -> FloatArray:
        raw = np.asarray(raw, dtype=float)
        if groups is None:
            return raw * math.exp(self.pooled_)
        offsets = np.array([self.offset(g) for g in groups])
        return raw * np.exp(offsets)

    def summary(self) -> dict[str, Any]:
        """Per group: calibration samples, prompts, effective prompts and the own offset's weight."""
        return {key: {"samples": self.counts_[key], "prompts": self.units_.get(key),
                      "effective_prompts": self.effective_.get(key), "own_weight": self.weights_.get(key),
                      "offset": round(self.by_group_[key], 4) if key in self.by_group_ else None}
                for key in self.counts_}

    def to_dict(self) -> dict[str, Any]:
        return {"quantile": self.quantile, "margin": self.margin, "min_group": self.min_group, "pooled": self.pooled_,
                "by_group": self.by_group_, "counts": self.counts_, "rank": self.rank,
                "shrinkage": self.shrinkage, "units": self.units_, "effective": self.effective_,
                "weights": self.weights_, "pooled_effective": self.pooled_effective_}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MondrianCalibrator:
        """Also reads manifests from before issue #14 (no rank: the sample rank with the hard fallback)."""
        return cls(quantile=data["quantile"], margin=data.get("margin", 0.0), min_group=data["min_group"],
                   rank=data.get("rank", "sample"),
                   shrinkage=data.get("shrinkage"), pooled_=data["pooled"],
                   by_group_=dict(data["by_group"]), counts_=dict(data.get("counts", {})),
                   units_=dict(data.get("units", {})), effective_=dict(data.get("effective", {})),
                   weights_=dict(data.get("weights", {})), pooled_effective_=data.get("pooled_effective", 0.0))


def _chain(chain: GroupKeys | None) -> tuple[str, ...]:
    if chain is None:
        return ()
    return (chain,) if isinstance(chain, str) else tuple(chain)


def _from_the_root(parents: dict[str, str | None]) -> list[str]:
    """The group keys ordered so that every parent comes before its children."""
    depth: dict[str, int] = {}

    def depth_of(key: str, seen: frozenset[str] = frozenset()) -> int:
        if key not in depth:
            parent = parents.get(key)
            depth[key] = 0 if parent is None or parent in seen else depth_of(parent, seen | {key}) + 1
        return depth[key]

    return sorted(parents, key=lambda k: (depth_of(k), k))


def _finite(value: float, scores: FloatArray) -> float:
    """An infinite conformal quantile (too few samples) falls back to the largest score seen."""
    return value if math.isfinite(value) else float(np.max(scores)) if len(scores) else 0.0
