"""A linear text score: ridge regression of a request's mean log length on its hashed n-grams + metadata.

Trees see text only through a 64-dim SVD projection, which blurs the keywords that matter ("essay",
"one word", "list 10"); a ridge over the full hashed space keeps them and hands the trees one strong
feature. For training rows the score is out-of-fold (grouped by prompt), so the booster does not learn
to trust an overfitted value.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

FloatArray = npt.NDArray[np.float64]


def design(hashed: sp.csr_matrix, meta: FloatArray) -> sp.csr_matrix:
    return sp.hstack([hashed, sp.csr_matrix(meta)], format="csr")


@dataclass
class TextScore:
    """``fit(hashed, meta, y)``; ``predict(hashed, meta)``; ``fit_oof`` also returns out-of-fold scores."""

    alpha: float = 1.0
    folds: int = 5
    coef_: FloatArray | None = None
    intercept_: float = 0.0

    def fit(self, hashed: sp.csr_matrix, meta: FloatArray, y: FloatArray) -> TextScore:
        from sklearn.linear_model import Ridge

        model = Ridge(alpha=self.alpha).fit(design(hashed, meta), y)
        self.coef_ = np.asarray(model.coef_, dtype=np.float64)
        self.intercept_ = float(model.intercept_)
        return self

    def fit_oof(self, hashed: sp.csr_matrix, meta: FloatArray, y: FloatArray, groups: Sequence[int]) -> FloatArray:
        """Fit on everything; return scores for the same rows predicted by models that did not see their group."""
        from sklearn.model_selection import GroupKFold

        oof = np.zeros(len(y))
        n_groups = len(set(groups))
        if n_groups >= self.folds:
            for train, held in GroupKFold(self.folds).split(hashed, y, groups):
                part = TextScore(self.alpha).fit(hashed[train], meta[train], y[train])
                oof[held] = part.predict(hashed[held], meta[held])
        self.fit(hashed, meta, y)
        return oof if n_groups >= self.folds else self.predict(hashed, meta)

    def predict(self, hashed: sp.csr_matrix, meta: FloatArray) -> FloatArray:
        if self.coef_ is None:
            raise RuntimeError("TextScore is not fitted")
        n_hash = hashed.shape[1]
        return np.asarray(hashed @ self.coef_[:n_hash] + meta @ self.coef_[n_hash:] + self.intercept_).reshape(-1)
