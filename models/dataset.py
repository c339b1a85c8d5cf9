"""Length data as training samples, and the prompt-level split that keeps every prompt in one split.

CASTILLO's own ``split`` column puts only the code sets in ``train``; we re-split by a hash of the prompt
id so every source set appears in fit, calibration and test, and no prompt is in two splits (its 10
samples share one feature vector: a prompt in two splits would leak).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from tempo.data.castillo import SPLITS, LengthRow, prompt_split
from tempo.models.features import RequestInfo
from tempo.models.length_bounds import LengthSamples


def samples_from_rows(rows: Iterable[LengthRow], prompts: dict[str, str]) -> LengthSamples:
    """One request per (prompt, model) row, one sample per sampled length."""
    requests: list[RequestInfo] = []
    index: list[int] = []
    lengths: list[int] = []
    for row in rows:
        requests.append(RequestInfo(row.input_tokens, row.dataset, row.model, prompt=prompts.get(row.prompt_id)))
        index.extend([len(requests) - 1] * len(row.samples))
        lengths.extend(row.samples)
    return LengthSamples(requests, np.asarray(index), np.asarray(lengths, dtype=float))


def split_rows(rows: Sequence[LengthRow], salt: str = "") -> dict[str, list[LengthRow]]:
    """Rows by split of their prompt."""
    out: dict[str, list[LengthRow]] = {s: [] for s in SPLITS}
    for row in rows:
        out[prompt_split(row.prompt_id, salt=salt)].append(row)
    return out
