"""Real completions for tests, the drift experiment and the load test: CASTILLO prompts with one served
model's real response lengths, as completion records; and small trained artifacts, cached.

Training a small model (``n_estimators=30`` on a row subset) takes seconds; the artifact is cached under
``.cache/estimator/<key>`` keyed by its parameters and rebuilt when missing or failing verification.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

from tempo.data.castillo import LengthRow, load_length_rows, load_prompts
from tempo.models.artifact import ArtifactError, save_artifact, verify_artifact
from tempo.models.dataset import samples_from_rows, split_rows
from tempo.models.features import FeatureSpec, PromptSketch
from tempo.models.length_bounds import LengthBoundModel

DEFAULT_MODEL = "meta-llama--Llama-3.1-8B-Instruct"
DRIFT_MODEL = "google--gemma-3-4b-it"
CLASS_OF_APP = {"Alpaca": "latency", "DollyDataset": "latency", "ShareGPT": "latency"}  # the rest: deadline
CACHE = Path(".cache/estimator")


@lru_cache(maxsize=1)
def _data() -> tuple[list[LengthRow], dict[str, str]]:
    return load_length_rows(), load_prompts()


def rows_for(model: str) -> dict[str, list[LengthRow]]:
    rows = [r for r in _data()[0] if r.model == model]
    splits: dict[str, list[LengthRow]] = split_rows(rows)
    return splits


def prompts() -> dict[str, str]:
    return _data()[1]


def completion_records(model: str, split: str = "test", n: int = 1000, seed: int = 0, prefix: str = "r",
                       with_prompt: bool = True) -> Iterator[dict[str, Any]]:
    """``n`` completion records: random prompts of ``split`` (or ``"all"``) with one of their real lengths."""
    splits = rows_for(model)
    rows = [r for rows in splits.values() for r in rows] if split == "all" else splits[split]
    texts = prompts()
    rng = random.Random(seed)
    spec = FeatureSpec()
    sketches: dict[str, dict[str, Any]] = {}
    for i in range(n):
        row = rng.choice(rows)
        record: dict[str, Any] = {
            "request_id": f"{prefix}-{i}", "model": row.model, "app": row.dataset,
            "slo_class": CLASS_OF_APP.get(row.dataset, "deadline"), "prompt_tokens": row.input_tokens,
            "output_tokens": rng.choice(row.samples),
        }
        if with_prompt:
            record["prompt"] = texts.get(row.prompt_id, "")
        else:
            if row.prompt_id not in sketches:
                sketches[row.prompt_id] = PromptSketch.of(texts.get(row.prompt_id, ""), spec).to_dict()
            record["sketch"] = sketches[row.prompt_id]
        yield record


def small_artifact(model: str = DEFAULT_MODEL, n_rows: int = 1500, n_estimators: int = 30,
                   cache: Path = CACHE, apps: tuple[str, ...] | None = None, quantile: float = 0.9) -> Path:
    """A small calibrated artifact for ``model`` (cached; ``apps``: train on these source apps only)."""
    key_parts: list[object] = ([model, n_rows, n_estimators, "v1"] + ([sorted(apps)] if apps else [])
                               + ([quantile] if quantile != 0.9 else []))
    key = hashlib.sha256(json.dumps(key_parts).encode()).hexdigest()[:12]
    directory = cache / f"artifact-{key}"
    try:
        verify_artifact(directory)
        return directory
    except ArtifactError:
        shutil.rmtree(directory, ignore_errors=True)
    splits = rows_for(model)
    if apps:
        splits = {name: [r for r in rows if r.dataset in apps] for name, rows in splits.items()}
    texts = prompts()
    fit = samples_from_rows(splits["fit"][:n_rows], texts)
    cal = samples_from_rows(splits["calibration"][: max(n_rows // 3, 300)], texts)
    bound_model = LengthBoundModel(quantile=quantile, model_params={"n_estimators": n_estimators})
    bound_model.fit(fit).calibrate(cal)
    save_artifact(bound_model, directory, data_summary={"model": model, "rows": n_rows})
    return directory
