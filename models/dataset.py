"""Length data as training samples, and the prompt-level split that keeps every prompt in one split.

CASTILLO's own ``split`` column puts only the code sets in ``train``; we re-split by a hash of the prompt
id so every source set appears in fit, calibration and test, and no prompt is in two splits (its 10
samples share one feature vector: a prompt in two splits would leak).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from tempo.data.castillo import SPLITS, LengthRow, prompt_split, prompt_unit
from tempo.models.features import RequestInfo
from tempo.models.length_bounds import LengthSamples


def samples_from_rows(rows: Iterable[LengthRow], prompts: dict[str, str]) -> LengthSamples:
    """One request per (prompt, model) row, one sample per sampled length; the prompt id is the unit
    of calibration (a prompt's rows for every served model are one exchangeable unit)."""
    requests: list[RequestInfo] = []
    index: list[int] = []
    lengths: list[int] = []
    units: list[int] = []
    unit_of: dict[str, int] = {}
    for row in rows:
        requests.append(RequestInfo(row.input_tokens, row.dataset, row.model, prompt=prompts.get(row.prompt_id)))
        units.append(unit_of.setdefault(row.prompt_id, len(unit_of)))
        index.extend([len(requests) - 1] * len(row.samples))
        lengths.extend(row.samples)
    return LengthSamples(requests, np.asarray(index), np.asarray(lengths, dtype=float), np.asarray(units))


def split_rows(rows: Sequence[LengthRow], salt: str = "") -> dict[str, list[LengthRow]]:
    """Rows by split of their prompt."""
    out: dict[str, list[LengthRow]] = {s: [] for s in SPLITS}
    for row in rows:
        out[prompt_split(row.prompt_id, salt=salt)].append(row)
    return out


def fold_rows(rows: Sequence[LengthRow], fold: int, folds: int, salt: str = "") -> dict[str, list[LengthRow]]:
    """Fold ``fold`` of a K-fold cross-evaluation by prompt: the prompts whose ``prompt_unit`` falls in the
    ``fold``-th K-th of [0, 1) are tested, those of the K-th before it (cyclically) calibrate, the rest fit.

    Every prompt is tested once and calibrates once over the K folds (so both the test and the calibration
    draws vary), and with K = 5 the last fold is exactly ``split_rows``' 60/20/20 split.
    """
    if not 0 <= fold < folds or folds < 3:
        raise ValueError(f"fold must be in [0, {folds}) with at least 3 folds")
    out: dict[str, list[LengthRow]] = {s: [] for s in SPLITS}
    for row in rows:
        part = min(int(prompt_unit(row.prompt_id, salt) * folds), folds - 1)
        name = "test" if part == fold else "calibration" if part == (fold - 1) % folds else "fit"
        out[name].append(row)
    return out
