"""Quantile regressors behind one scikit-learn-style interface: ``fit(X, y)`` and ``predict_quantile(X)``.

All fit the q-quantile of log(length): quantiles commute with monotone maps, and the log tames the heavy
tail. Defaults are regularised on purpose: CASTILLO repeats every prompt 10 times with noisy lengths, and
an unregularised booster memorises prompts (raw coverage 0.73-0.88 at q = 0.9); many rows per leaf and
L2 keep it near-calibrated before conformal calibration finishes the job.

Serialisation: LightGBM in its native text format; the scikit-learn models through skops with an
explicit list of trusted types (never pickle).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]


class QuantileModel(Protocol):
    quantile: float

    def fit(self, X: FloatArray, y: FloatArray, sample_weight: FloatArray | None = None) -> QuantileModel: ...

    def predict_quantile(self, X: FloatArray) -> FloatArray: ...

    def save(self, directory: Path) -> list[str]: ...


class LightGBMQuantile:
    """LightGBM with ``objective="quantile"`` on log lengths."""

    kind: ClassVar[str] = "lightgbm"
    FILE: ClassVar[str] = "lightgbm.txt"

    def __init__(
        self,
        quantile: float = 0.9,
        n_estimators: int = 300,
        learning_rate: float = 0.05,
        num_leaves: int = 15,
        min_child_samples: int = 200,
        reg_lambda: float = 5.0,
        subsample: float = 0.8,
        colsample: float = 0.8,
        seed: int = 0,
    ) -> None:
        self.quantile = quantile
        self.n_estimators = n_estimators
        self.learning_rate = learning_rate
        self.num_leaves = num_leaves
        self.min_child_samples = min_child_samples
        self.reg_lambda = reg_lambda
        self.subsample = subsample
        self.colsample = colsample
        self.seed = seed

    def params(self) -> dict[str, Any]:
        return {
            "objective": "quantile",
            "alpha": self.quantile,
            "learning_rate": self.learning_rate,
            "num_leaves": self.num_leaves,
            "min_data_in_leaf": self.min_child_samples,
            "lambda_l2": self.reg_lambda,
            "bagging_fraction": self.subsample,
            "bagging_freq": 1,
            "feature_fraction": self.colsample,
            "seed": self.seed,
            "num_threads": 1,  # OpenMP spin-waits collapse when cores are shared; one thread is predictable
            "verbosity": -1,
            "deterministic": True,
            "force_row_wise": True,
        }

    def fit(self, X: FloatArray, y: FloatArray, sample_weight: FloatArray | None = None) -> LightGBMQuantile:
        import lightgbm as lgb

        data = lgb.Dataset(X, np.log(y), weight=sample_weight, free_raw_data=True)
        self.booster_ = lgb.train(self.params(), data, num_boost_round=self.n_estimators)
        return self

    def predict_quantile(self, X: FloatArray) -> FloatArray:
        return np.exp(self.booster_.predict(X, num_threads=1))

    def save(self, directory: Path) -> list[str]:
        self.booster_.save_model(str(directory / self.FILE))
        return [self.FILE]

    @classmethod
    def load(cls, directory: Path, quantile: float) -> LightGBMQuantile:
        import lightgbm as lgb

        model = cls(quantile=quantile)
        model.booster_ = lgb.Booster(model_file=str(directory / cls.FILE))
        return model


class _SkopsModel:
    """Shared save/load for the scikit-learn based models (skops, trusted types only)."""

    kind: ClassVar[str]
    FILE: ClassVar[str]
    TRUSTED: ClassVar[list[str]]
    quantile: float
    model_: Any

    def save(self, directory: Path) -> list[str]:
        import skops.io as sio

        sio.dump(self.model_, directory / self.FILE)
        return [self.FILE]

    @classmethod
    def load(cls, directory: Path, quantile: float) -> _SkopsModel:
        import skops.io as sio

        path = directory / cls.FILE
        untrusted = [t for t in sio.get_untrusted_types(file=path) if t not in cls.TRUSTED]
        if untrusted:
            raise ValueError(f"{path}: artifact holds unexpected types {untrusted}")
        model = cls.__new__(cls)
        model.quantile = quantile
        model.model_ = sio.load(path, trusted=cls.TRUSTED)
        return model


class HistGBQuantile(_SkopsModel):
    """scikit-learn's histogram gradient boosting with quantile loss, on log lengths."""

    kind = "hist_gb"
    FILE = "hist_gb.skops"
    TRUSTED: ClassVar[list[str]] = [
        "sklearn.ensemble._hist_gradient_boosting.binning._BinMapper",
        "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
        "sklearn._loss.link.IdentityLink",
        "sklearn._loss.link.Interval",
        "sklearn._loss.loss.PinballLoss",
        "sklearn._loss._loss.CyPinballLoss",
        "collections.OrderedDict",
        "numpy.random._mt19937.MT19937",
    ]

    def __init__(self, quantile: float = 0.9, max_iter: int = 300, max_leaf_nodes: int = 15,
                 min_samples_leaf: int = 200, l2_regularization: float = 5.0, seed: int = 0) -> None:
        self.quantile = quantile
        self.max_iter = max_iter
        self.max_leaf_nodes = max_leaf_nodes
        self.min_samples_leaf = min_samples_leaf
        self.l2_regularization = l2_regularization
        self.seed = seed

    def fit(self, X: FloatArray, y: FloatArray, sample_weight: FloatArray | None = None) -> HistGBQuantile:
        from sklearn.ensemble import HistGradientBoostingRegressor

        self.model_ = HistGradientBoostingRegressor(
            loss="quantile", quantile=self.quantile, learning_rate=0.05, max_iter=self.max_iter,
            max_leaf_nodes=self.max_leaf_nodes, min_samples_leaf=self.min_samples_leaf,
            l2_regularization=self.l2_regularization, early_stopping=False, random_state=self.seed,
        ).fit(X, np.log(y), sample_weight=sample_weight)
        return self

    def predict_quantile(self, X: FloatArray) -> FloatArray:
        return np.exp(self.model_.predict(X))


class ForestQuantile(_SkopsModel):
    """Quantile regression forest (quantile-forest): nearly calibrated raw, slower to predict."""

    kind = "qrf"
    FILE = "qrf.skops"
    TRUSTED: ClassVar[list[str]] = [
        "quantile_forest._quantile_forest.RandomForestQuantileRegressor",
        "quantile_forest._quantile_forest_fast.QuantileForest",
        "sklearn.tree._classes.ExtraTreeRegressor",
        "sklearn.tree._classes.DecisionTreeRegressor",
        "sklearn.tree._tree.Tree",
        "numpy.random._mt19937.MT19937",
    ]

    def __init__(self, quantile: float = 0.9, n_estimators: int = 100, min_samples_leaf: int = 20,
                 max_depth: int | None = None, seed: int = 0) -> None:
        self.quantile = quantile
        self.n_estimators = n_estimators
        self.min_samples_leaf = min_samples_leaf
        self.max_depth = max_depth
        self.seed = seed

    def fit(self, X: FloatArray, y: FloatArray, sample_weight: FloatArray | None = None) -> ForestQuantile:
        from quantile_forest import RandomForestQuantileRegressor

        self.model_ = RandomForestQuantileRegressor(
            n_estimators=self.n_estimators, min_samples_leaf=self.min_samples_leaf, max_depth=self.max_depth,
            max_features=0.5, random_state=self.seed, n_jobs=2,
        ).fit(X, np.log(y), sample_weight=sample_weight)
        return self

    def predict_quantile(self, X: FloatArray) -> FloatArray:
        self.model_.n_jobs = 1
        return np.exp(np.asarray(self.model_.predict(X, quantiles=[self.quantile])).reshape(-1))


MODEL_KINDS: dict[str, type[LightGBMQuantile] | type[HistGBQuantile] | type[ForestQuantile]] = {
    LightGBMQuantile.kind: LightGBMQuantile,
    HistGBQuantile.kind: HistGBQuantile,
    ForestQuantile.kind: ForestQuantile,
}


def make_model(kind: str, quantile: float, **params: Any) -> QuantileModel:
    """A new, unfitted model of ``kind`` (lightgbm, hist_gb, qrf)."""
    try:
        return MODEL_KINDS[kind](quantile=quantile, **params)
    except KeyError:
        raise ValueError(f"unknown model kind {kind!r} (known: {', '.join(MODEL_KINDS)})") from None
