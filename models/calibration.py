"""Split-conformal calibration of upper bounds (CQR with multiplicative scores), Mondrian by group.

The score of a calibration sample is ``log(true) - log(raw bound)``; the bound is then multiplied by
``exp(the conformal quantile of the scores)``. With n exchangeable scores, taking the ceil((n+1)q)-th
smallest guarantees coverage >= q on a new sample. Groups (apps) with too few samples share the pooled
offset, so a rare app is not calibrated on noise.

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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
GroupKeys = str | tuple[str, ...]  # one key, or a chain from the most specific group to the least


def conformal_quantile(scores: FloatArray, quantile: float) -> float:
    """The ceil((n+1)q)-th smallest score (finite-sample valid); +inf when n is too small for q."""
    n = len(scores)
    if n == 0:
        return math.inf
    rank = math.ceil((n + 1) * quantile)
    if rank > n:
        return math.inf
    return float(np.partition(scores, rank - 1)[rank - 1])


@dataclass
class MondrianCalibrator:
    """Log-offsets per group plus a pooled one; ``fit`` on calibration data, ``apply`` to raw bounds."""

    quantile: float
    min_group: int = 300  # samples a group needs for an offset of its own
    pooled_: float = 0.0
    by_group_: dict[str, float] = field(default_factory=dict)
    counts_: dict[str, int] = field(default_factory=dict)

    def fit(self, raw: FloatArray, true: FloatArray, groups: Sequence[GroupKeys] | None = None) -> MondrianCalibrator:
        """``groups[i]`` is sample i's chain of group keys, most specific first (e.g. ("model|app", "app"))."""
        scores = np.log(np.asarray(true, dtype=float)) - np.log(np.asarray(raw, dtype=float))
        self.pooled_ = _finite(conformal_quantile(scores, self.quantile), scores)
        self.by_group_, self.counts_ = {}, {}
        if groups is not None:
            members: dict[str, list[int]] = {}
            for i, chain in enumerate(groups):
                for key in _chain(chain):
                    members.setdefault(key, []).append(i)
            for key, rows in members.items():
                self.counts_[key] = len(rows)
                if len(rows) >= self.min_group:
                    self.by_group_[key] = _finite(conformal_quantile(scores[rows], self.quantile), scores[rows])
        return self

    def offset(self, chain: GroupKeys | None) -> float:
        """The offset of the most specific group in ``chain`` that had enough samples, else the pooled one."""
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

    def to_dict(self) -> dict[str, Any]:
        return {"quantile": self.quantile, "min_group": self.min_group, "pooled": self.pooled_,
                "by_group": self.by_group_, "counts": self.counts_}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MondrianCalibrator:
        return cls(quantile=data["quantile"], min_group=data["min_group"], pooled_=data["pooled"],
                   by_group_=dict(data["by_group"]), counts_=dict(data.get("counts", {})))


def _chain(chain: GroupKeys | None) -> tuple[str, ...]:
    if chain is None:
        return ()
    return (chain,) if isinstance(chain, str) else tuple(chain)


def _finite(value: float, scores: FloatArray) -> float:
    """An infinite conformal quantile (too few samples) falls back to the largest score seen."""
    return value if math.isfinite(value) else float(np.max(scores)) if len(scores) else 0.0
