"""Readers for CASTILLO-format length data: any CSV(.gz) or JSONL(.gz) file with the same fields.

Shared by the workload builder (serving) and the length models' evaluation, so both read one format
one way. Malformed input raises TempoError naming the file and line.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tempo.data import data_path

from tempo.errors import TempoError

# CASTILLO samples at or above this are degenerate runs that hit the generator's cap (data README).
DEGENERATE_LENGTH = 15_000
CASTILLO_SAMPLES = tuple(f"out{i}" for i in range(10))
CASTILLO_COLUMNS = ("dataset", "model", "prompt_id", "input_tokens")
SPLITS = ("fit", "calibration", "test")


@dataclass(frozen=True, slots=True)
class LengthRow:
    """One (prompt, served model) row of CASTILLO: the prompt's size and its sampled response lengths."""

    dataset: str
    model: str
    prompt_id: str
    input_tokens: int
    samples: tuple[int, ...]  # valid (non-degenerate) response lengths, at least one


def prompt_unit(prompt_id: str, salt: str = "") -> float:
    """A prompt's place in [0, 1), from a hash of its id (stable across runs, machines and files)."""
    digest = hashlib.sha256(f"{salt}{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def prompt_split(prompt_id: str, fractions: Sequence[float] = (0.6, 0.2, 0.2), salt: str = "") -> str:
    """The split of a prompt: consecutive intervals of ``prompt_unit`` in ``SPLITS`` order."""
    u = prompt_unit(prompt_id, salt)
    total, edge = sum(fractions), 0.0
    for name, share in zip(SPLITS, fractions, strict=True):
        edge += share / total
        if u < edge:
            return name
    return SPLITS[-1]


def open_text(path: Path) -> io.TextIOWrapper:
    """A text handle on a plain or gzip-compressed file; TempoError when it does not exist."""
    if not path.is_file():
        raise TempoError(f"file not found: {path}")
    raw = gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")  # noqa: SIM115 (caller closes)
    return io.TextIOWrapper(raw, encoding="utf-8")


def castillo_lengths_path() -> Path:
    return data_path("castillo", "castillo_lengths.csv.gz")


def castillo_prompts_path() -> Path:
    return data_path("castillo", "castillo_prompts.jsonl.gz")


def _is_jsonl(path: Path) -> bool:
    return ".jsonl" in path.suffixes or ".json" in path.suffixes


def _records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with open_text(path) as handle:
        if _is_jsonl(path):
            for line, text in enumerate(handle, start=1):
                if text.strip():
                    try:
                        record = json.loads(text)
                    except json.JSONDecodeError:
                        raise TempoError(f"{path}:{line}: not JSON") from None
                    if not isinstance(record, dict):
                        raise TempoError(f"{path}:{line}: expected a JSON object")
                    yield line, record
            return
        reader = csv.DictReader(handle)
        missing = [c for c in CASTILLO_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise TempoError(f"{path}: not a CASTILLO lengths file, missing columns {missing}")
        for line, record in enumerate(reader, start=2):
            yield line, record


def load_length_rows(path: Path | None = None) -> list[LengthRow]:
    """Length rows (``dataset, model, prompt_id, input_tokens, out0..out9``; JSONL may give ``outputs``
    as a list instead), degenerate samples dropped, and rows left with none."""
    path = path or castillo_lengths_path()
    rows: list[LengthRow] = []
    for line, record in _records(path):
        try:
            if "outputs" in record:
                values = list(record["outputs"])
            else:
                values = [record[c] for c in CASTILLO_SAMPLES if record.get(c) not in ("", None)]
            samples = tuple(int(float(v)) for v in values)
            input_tokens = int(float(record["input_tokens"]))
            key = (str(record["dataset"]), str(record["model"]), str(record["prompt_id"]))
        except (KeyError, TypeError, ValueError):
            raise TempoError(
                f"{path}:{line}: malformed row (needs dataset, model, prompt_id, numeric input_tokens and "
                "out0..out9)"
            ) from None
        if not samples:
            raise TempoError(f"{path}:{line}: malformed row (no output lengths)")
        valid = tuple(s for s in samples if 0 < s < DEGENERATE_LENGTH)
        if valid and input_tokens > 0:
            rows.append(LengthRow(*key[:2], key[2], input_tokens, valid))
    if not rows:
        raise TempoError(f"{path}: no usable rows")
    return rows


def load_prompts(path: Path | None = None) -> dict[str, str]:
    """prompt_id -> prompt text from a JSONL(.gz) file with ``prompt_id`` and ``prompt_text``."""
    path = path or castillo_prompts_path()
    prompts: dict[str, str] = {}
    with open_text(path) as handle:
        for line, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
                prompts[str(record["prompt_id"])] = str(record["prompt_text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise TempoError(f"{path}:{line}: expected a JSON object with prompt_id and prompt_text") from None
    return prompts
