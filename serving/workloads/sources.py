"""Readers for the real data the workloads are built from, and the arrival processes.

Every reader accepts any file of the same format (not only the vendored one) and raises TempoError
naming the file and line on malformed input.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from tempo.data import data_path
from tempo.data.castillo import open_text as _open_text

from tempo.errors import TempoError


@dataclass(frozen=True, slots=True)
class Call:
    """One LLM call of a compound workflow."""

    input_tokens: int
    output_tokens: int


@dataclass(frozen=True, slots=True)
class Workflow:
    """A compound job: stages of calls; every call of stage s depends on every call of stage s-1."""

    workflow_id: str
    stages: tuple[tuple[Call, ...], ...]


def deep_research_path() -> Path:
    return data_path("agentic", "jitserve_deepresearch_training.json")


def azure_conv_trace_path() -> Path:
    return data_path("azure_llm_2023", "AzureLLMInferenceTrace_conv.csv")


def split_workflows(workflows: list[Workflow] | tuple[Workflow, ...],
                    train_fraction: float = 0.5) -> tuple[list[Workflow], list[Workflow]]:
    """``(train, serve)``: the workflows split by a stable hash of their id, so that the past jobs a policy
    learns from (graph matching, per-app quantiles) are never the jobs it is benchmarked on."""
    train: list[Workflow] = []
    serve: list[Workflow] = []
    for flow in workflows:
        digest = hashlib.sha1(f"workflow:{flow.workflow_id}".encode()).digest()
        (train if int.from_bytes(digest[:8], "big") / 2**64 < train_fraction else serve).append(flow)
    return train, serve


def load_workflows(path: Path | None = None) -> list[Workflow]:
    """Compound workflows from the deep-research JSON (``[{request_id, stages: [{requests: [...]}]}]``)."""
    path = path or deep_research_path()
    with _open_text(path) as handle:
        try:
            raw = json.load(handle)
        except json.JSONDecodeError as exc:
            raise TempoError(f"{path}: not JSON: {exc.msg}") from None
    workflows: list[Workflow] = []
    try:
        for item in raw:
            stages = tuple(
                tuple(Call(int(c["input_tokens"]), int(c["output_tokens"])) for c in stage["requests"])
                for stage in sorted(item["stages"], key=lambda s: int(s["stage_number"]))
            )
            if stages and all(stages) and all(c.input_tokens > 0 and c.output_tokens > 0 for s in stages for c in s):
                workflows.append(Workflow(str(item["request_id"]), stages))
    except (KeyError, TypeError, ValueError):
        raise TempoError(f"{path}: malformed workflow entry (expected request_id, stages[].requests[])") from None
    if not workflows:
        raise TempoError(f"{path}: no usable workflows")
    return workflows


def _parse_timestamp(text: str) -> float:
    """Seconds since the epoch from an ISO-like timestamp (any number of fraction digits) or a number."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    base, _, fraction = text.partition(".")
    stamp = datetime.fromisoformat(base.replace("T", " "))
    return stamp.timestamp() + (float("0." + fraction) if fraction else 0.0)


def _trace_rows(path: Path) -> Iterator[tuple[int, str]]:
    with _open_text(path) as handle:
        reader = csv.reader(handle)
        header = [h.strip() for h in next(reader, [])]
        if "TIMESTAMP" not in header:
            raise TempoError(f"{path}:1: not an arrival trace: expected a TIMESTAMP column, got {header}")
        column = header.index("TIMESTAMP")
        for line, row in enumerate(reader, start=2):
            if not row or not "".join(row).strip():
                continue
            if len(row) != len(header):
                raise TempoError(f"{path}:{line}: malformed trace row: {len(row)} fields, header has {len(header)}")
            yield line, row[column]


def load_arrival_trace(path: Path) -> np.ndarray:
    """Arrival times (seconds, from 0, sorted) of a trace in the Azure CSV format."""
    times: list[float] = []
    for line, value in _trace_rows(path):
        try:
            times.append(_parse_timestamp(value))
        except ValueError:
            raise TempoError(f"{path}:{line}: malformed trace row: bad TIMESTAMP {value!r}") from None
    if len(times) < 2:
        raise TempoError(f"{path}: an arrival trace needs at least two rows")
    arr = np.sort(np.asarray(times, dtype=float))
    if arr[-1] <= arr[0]:
        raise TempoError(f"{path}: all arrivals share one timestamp; the trace has no time span")
    return arr - arr[0]


def poisson_arrivals(rate: float, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    """Arrival times of a Poisson process of ``rate`` per second over ``[0, duration_s)``."""
    expected = rate * duration_s
    gaps = rng.exponential(1.0 / rate, size=int(expected + 10 * np.sqrt(expected) + 10))
    times = np.cumsum(gaps) - gaps[0]
    while times[-1] < duration_s:  # extremely unlikely; extend rather than truncate the process
        more = rng.exponential(1.0 / rate, size=len(gaps))
        times = np.concatenate([times, times[-1] + np.cumsum(more)])
    return times[times < duration_s]


def trace_arrivals(trace_s: np.ndarray, rate: float, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    """``round(rate * duration)`` arrivals in ``[0, duration_s)`` with the trace's burst shape.

    Takes that many consecutive inter-arrival gaps from a seeded random point of the trace (wrapping
    around its end) and rescales the window to ``duration_s``, so the rate is exactly the target while
    bursts keep their relative shape.
    """
    gaps = np.diff(trace_s)
    wrap_gap = float(trace_s[-1]) / max(len(gaps), 1)  # join the end of the trace to its start
    gaps = np.append(gaps, wrap_gap)
    count = max(1, round(rate * duration_s))
    start = int(rng.integers(len(gaps)))
    window = np.take(gaps, np.arange(start, start + count), mode="wrap")
    total = float(window.sum())
    if total <= 0:
        raise TempoError("the chosen trace window has no time span; use a longer trace or duration")
    return np.concatenate([[0.0], np.cumsum(window[:-1])]) * (duration_s / total)
