"""The estimator's in-memory core: the served batch model, the online learner and the fallback bounds.

Everything a request needs is in memory, so ``/v1/estimate`` keeps answering while Redis is down. The
served model is swapped by replacing one reference (``swap``): a request in flight finishes on the model
it started with, none is dropped.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tempo.estimator.jobs import JobRecorder
from tempo.estimator.schemas import EstimateRequest, EstimateResponse
from tempo.models.artifact import MANIFEST, ArtifactError, load_artifact
from tempo.models.features import (
    FeatureSpec,
    PromptSketch,
    RequestInfo,
    app_key,
    sketch_texts,
    unpack_sketch,
)
from tempo.models.job_graphs import GraphEstimate, GraphStore
from tempo.models.length_bounds import LengthBoundModel
from tempo.models.online import Observation, OnlineLengthLearner
from tempo.scheduler.bounds import BoundLadder, prompt_tokens_of_text
from tempo.scheduler.jobs import JobGraph

CLASSES = ("latency", "deadline", "compound", "best_effort")


def manifest_digest(directory: Path) -> str:
    return hashlib.sha256((directory / MANIFEST).read_bytes()).hexdigest()


@dataclass(frozen=True)
class ServedModel:
    version: str
    model: LengthBoundModel
    digest: str
    apps: frozenset[str]
    models: frozenset[str]

    @classmethod
    def load(cls, directory: Path, expected_digest: str | None = None) -> ServedModel:
        """Verify (checksums, and the registry's manifest digest when given) and load an artifact."""
        digest = manifest_digest(directory) if (directory / MANIFEST).is_file() else ""
        if expected_digest is not None and digest != expected_digest:
            raise ArtifactError(f"{directory}: manifest digest differs from the registry's (tampered or replaced)")
        model = load_artifact(directory)
        version = directory.name
        spec = model.spec
        return cls(version, model, digest, frozenset(spec.apps), frozenset(spec.models))

    def knows(self, request: RequestInfo) -> bool:
        """The batch model saw this request's served model and app in training."""
        model_ok = request.model is None or request.model in self.models
        app_ok = request.app is None or app_key(request.app) in self.apps
        return model_ok and app_ok


class FallbackBounds:
    """Per-class empirical q-quantile of recent completion lengths (``fallback: true`` answers)."""

    def __init__(self, quantile: float, window: int = 2000, default: int = 1024, min_samples: int = 20) -> None:
        self.quantile = quantile
        self.default = default
        self.min_samples = min_samples
        self._lengths: dict[str, deque[int]] = {c: deque(maxlen=window) for c in CLASSES}
        self._cache: dict[str, int] = {}
        self._all: deque[int] = deque(maxlen=window)

    def observe(self, slo_class: str, length: int) -> None:
        self._lengths.setdefault(slo_class, deque(maxlen=self._all.maxlen)).append(int(length))
        self._all.append(int(length))
        self._cache.clear()

    def bound(self, slo_class: str) -> int:
        if slo_class not in self._cache:
            values = self._lengths.get(slo_class) or ()
            if len(values) < self.min_samples:
                values = self._all
            if len(values) < self.min_samples:
                self._cache[slo_class] = self.default
            else:
                value = float(np.quantile(np.fromiter(values, float), self.quantile))
                self._cache[slo_class] = max(1, math.ceil(value))
        return self._cache[slo_class]


@dataclass
class CoverageTracker:
    """Rolling coverage and overestimation (bound / length) of recent completions per (model, class)."""

    window: int = 500
    max_keys: int = 100  # label cardinality cap: later keys share ("other", class)
    recent: dict[tuple[str, str], deque[tuple[bool, float]]] = field(default_factory=dict)

    def observe(self, model: str | None, slo_class: str, bound: int, length: int) -> tuple[str, str]:
        key = (model or "unknown", slo_class)
        if key not in self.recent and len(self.recent) >= self.max_keys:
            key = ("other", slo_class)
        window = self.recent.setdefault(key, deque(maxlen=self.window))
        window.append((length <= bound, bound / max(length, 1)))
        return key

    def summary(self, key: tuple[str, str]) -> tuple[float, float]:
        window = self.recent[key]
        return sum(c for c, _ in window) / len(window), sum(r for _, r in window) / len(window)


TRUE_LENGTH_FINISHES = (None, "stop", "length")  # None: records from clients that do not say


def is_true_length(record: dict[str, Any]) -> bool:
    """Whether a completion record's ``output_tokens`` is the response's full length."""
    return record.get("finish_reason") in TRUE_LENGTH_FINISHES


def estimate_prompt_tokens(request: EstimateRequest) -> int:
    if request.prompt_tokens is not None:
        return int(request.prompt_tokens)
    return prompt_tokens_of_text(request.prompt)


def learned_prompt_tokens(record: dict[str, Any]) -> int:
    """The prompt length a completion is learned with: the one its bound was estimated for when serving
    recorded it (``estimate_prompt_tokens``: a guess from the text), else the engine's count. The engine's
    count of a chat request includes its template; learning from it while serving from the guess would
    fit the model and its calibrators to features the served bounds never see."""
    value = record.get("estimate_prompt_tokens")
    return int(value if value is not None else record["prompt_tokens"])


def _scaled(ladder: BoundLadder, factor: float, max_tokens: int | None) -> list[tuple[int, int]]:
    """The ladder's bounds times ``factor``, capped at ``max_tokens``, kept monotone and above k."""
    steps: list[tuple[int, int]] = []
    for k, bound in ladder.steps:
        if max_tokens is not None and k >= max_tokens:
            break
        value = max(math.ceil(bound * factor), k + 1)
        if max_tokens is not None:
            value = min(value, max_tokens)
        if steps:
            value = max(value, steps[-1][1])
        steps.append((int(k), int(value)))
    return steps or [(0, 1)]


class LRU:
    """A small thread-safe LRU map (prompt sketches, raw batch ladders)."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._data: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Any) -> Any:
        with self._lock:
            value = self._data.get(key)
            if value is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: Any, value: Any) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)


def text_key(text: str | None) -> bytes:
    return hashlib.blake2b((text or "").encode("utf-8"), digest_size=16).digest()


class Estimator:
    """Bounds for requests from whatever is available: batch model, River model, fallback.

    Caches (LRU, by a digest of the prompt): the prompt's sketch, and the served batch model's raw ladder
    per (version, prompt, metadata). The online factor is applied on top at every request, so a cached
    ladder still follows the calibration; repeated prompts (retries, refine calls, shared system
    prompts) skip the featurizer and the model.
    """

    def __init__(self, quantile: float, learner: OnlineLengthLearner | None = None,
                 fallback: FallbackBounds | None = None, cache_size: int = 8192,
                 graphs: GraphStore | None = None, job_done_s: float = 120.0, recent_size: int = 500) -> None:
        self.quantile = quantile
        # the last completions this process learned (sketches, not prompts; none kept across a restart): a
        # model swapped in is calibrated on them
        self.recent: deque[Observation] = deque(maxlen=recent_size)
        # compound jobs: the pattern graphs of finished jobs, learned from the completion records
        self.graphs = graphs or GraphStore(quantile=quantile)
        self.jobs = JobRecorder(done_after_s=job_done_s)
        self.learner = learner or OnlineLengthLearner(quantile=quantile)
        self.fallback = fallback or FallbackBounds(quantile)
        self.coverage = CoverageTracker()
        self.served: ServedModel | None = None
        self.lock = threading.Lock()  # guards the learner between the worker and requests
        self.hash_spec = FeatureSpec()
        self.sketches = LRU(cache_size)
        self.raw_ladders = LRU(cache_size)

    # -- model -----------------------------------------------------------------------------------
    def swap(self, served: ServedModel | None) -> None:
        """Serve another batch model. Its calibrators start from the recent completions scored with its own
        bounds, not from the old model's offsets (fitted to another model's errors) nor from none: a model
        retrained on capped lengths covers its hold-out fully, and left uncalibrated it over-reserves for the
        hundreds of completions an online calibrator takes to correct it."""
        with self.lock:
            recent = list(self.recent)
        raw = served.model.predict_bound([o.request for o in recent]) if served is not None and recent else []
        with self.lock:
            self.served = served
            self.learner.reset_source("batch")
            self.learner.calibrate_source("batch", recent[:len(raw)], [float(b) for b in raw])

    def set_learner(self, learner: OnlineLengthLearner) -> None:
        with self.lock:
            self.learner = learner

    @property
    def version(self) -> str | None:
        served = self.served
        return served.version if served is not None else None

    def sketch(self, text: str | None, key: bytes | None = None) -> PromptSketch:
        key = key if key is not None else text_key(text)
        sketch = self.sketches.get(key)
        if sketch is None:
            sketch = PromptSketch.of(text, self.hash_spec)
            self.sketches.put(key, sketch)
        return sketch  # type: ignore[no-any-return,unused-ignore]

    def sketches_for(self, texts: Sequence[str | None], keys: Sequence[bytes]) -> list[PromptSketch]:
        """Sketches of many prompts: from the cache, the missing ones hashed together in one pass."""
        found = [self.sketches.get(k) for k in keys]
        missing = {k: text or "" for k, text, sketch in zip(keys, texts, found, strict=True) if sketch is None}
        fresh = dict(zip(missing, sketch_texts(list(missing.values()), self.hash_spec), strict=True))
        for key, sketch in fresh.items():
            self.sketches.put(key, sketch)
        return [sketch if sketch is not None else fresh[k] for k, sketch in zip(keys, found, strict=True)]

    # -- estimates -------------------------------------------------------------------------------
    def estimate(self, requests: Sequence[EstimateRequest]) -> list[EstimateResponse]:
        served = self.served
        keys = [text_key(r.prompt) for r in requests]
        sketches = self.sketches_for([r.prompt for r in requests], keys)
        infos = [RequestInfo(estimate_prompt_tokens(r), r.app, r.model, r.slo_class, sketch=sketch)
                 for r, sketch in zip(requests, sketches, strict=True)]
        out: list[EstimateResponse | None] = [None] * len(requests)
        batch_rows: list[int] = []
        with self.lock:
            for i, info in enumerate(infos):
                knows = served is not None and served.knows(info)
                source = self.learner.source_for(info, knows)
                if source == "river":
                    assert info.sketch is not None
                    b0 = self.learner.river_bound(info, info.sketch)
                    factor = self.learner.factor("river", info.model, info.app)
                    out[i] = self._response(requests[i], BoundLadder.fixed(math.ceil(b0), self.quantile), factor,
                                            "river", None)
                elif served is not None:
                    batch_rows.append(i)
                else:
                    bound = self.fallback.bound(info.slo_class or "latency")
                    out[i] = self._response(requests[i], BoundLadder.fixed(bound, self.quantile, True), 1.0,
                                            "fallback", None)
            factors = {i: self.learner.factor("batch", infos[i].model, infos[i].app) for i in batch_rows}
        if batch_rows:
            assert served is not None
            ladder_keys = {i: (served.version, keys[i], infos[i].prompt_tokens, infos[i].app, infos[i].model,
                               infos[i].slo_class) for i in batch_rows}
            ladders: dict[int, BoundLadder] = {}
            for i in batch_rows:
                if (cached := self.raw_ladders.get(ladder_keys[i])) is not None:
                    ladders[i] = cached
            missing = [i for i in batch_rows if i not in ladders]
            if missing:
                for i, ladder in zip(missing, served.model.predict_ladders([infos[i] for i in missing]), strict=True):
                    ladders[i] = ladder
                    self.raw_ladders.put(ladder_keys[i], ladder)
            for i in batch_rows:
                out[i] = self._response(requests[i], ladders[i], factors[i], "batch", served.version)
        return [r for r in out if r is not None]

    def _response(self, request: EstimateRequest, ladder: BoundLadder, factor: float, source: str,
                  version: str | None) -> EstimateResponse:
        steps = _scaled(ladder, factor, request.max_tokens)
        # built from checked values: no validation pass (FastAPI validates the response model on the way out)
        return EstimateResponse.model_construct(upper_bound=steps[0][1], quantile=self.quantile, ladder=steps,
                                                model_version=version, fallback=source == "fallback", source=source)

    def check_quantile(self, quantile: float | None) -> str | None:
        """An error message when a request asks for a quantile other than the served one."""
        if quantile is not None and abs(quantile - self.quantile) > 1e-9:
            return f"quantile {quantile} is not served; this service serves quantile {self.quantile}"
        return None

    # -- learning --------------------------------------------------------------------------------
    def parse(self, record: dict[str, Any]) -> Observation | None:
        """A completion record as an observation; None when it is malformed or its length is not a true
        length (rejected, aborted or failed requests: censored), so it is skipped."""
        if not is_true_length(record):
            return None
        try:
            data, prompt = record.get("sketch"), record.get("prompt")
            if isinstance(data, dict):
                sketch = unpack_sketch(data, self.hash_spec)
            elif isinstance(prompt, str | None):
                sketch = self.sketch(prompt)
            else:
                return None
            app, model = record.get("app"), record.get("model")
            if not (isinstance(app, str | None) and isinstance(model, str | None)
                    and isinstance(record["slo_class"], str)):
                return None
            info = RequestInfo(learned_prompt_tokens(record), app, model, record["slo_class"], sketch=sketch)
            length = float(record["output_tokens"])
        except (KeyError, TypeError, ValueError):
            return None
        return Observation(info, sketch, length, None) if length >= 1 and info.prompt_tokens >= 0 else None

    def observations(self, records: Sequence[dict[str, Any]]) -> list[Observation]:
        """Observations of well-formed records, with the served batch model's raw B0 (one batched call)."""
        served = self.served
        obs = [o for o in map(self.parse, records) if o is not None]
        if served is not None and obs:
            b0 = served.model.predict_bound([o.request for o in obs])
            for o, b in zip(obs, b0, strict=True):
                o.batch_bound = float(b)
        return obs

    def apply(self, records: Sequence[dict[str, Any]]) -> tuple[int, list[tuple[str, str, float, float]]]:
        """Learn from completion records (malformed ones skipped); returns (applied, coverage updates)."""
        parsed = [(r, o) for r, o in zip(records, map(self.parse, records), strict=True) if o is not None]
        served = self.served
        if served is not None and parsed:
            b0 = served.model.predict_bound([o.request for _, o in parsed])
            for (_, o), b in zip(parsed, b0, strict=True):
                o.batch_bound = float(b)
        updates = []
        now = time.time()
        with self.lock:
            for record in records:
                self.jobs.observe(record, now)
            self._learn_jobs(None)  # on the records' clock: later calls of a job may still be in the backlog
            for record, o in parsed:
                self.learner.learn_one(o)
                self.recent.append(o)
                length = int(o.length)
                slo_class = o.request.slo_class or "latency"
                self.fallback.observe(slo_class, length)
                bound = record.get("bound")
                if isinstance(bound, int) and bound >= 1:
                    key = self.coverage.observe(o.request.model, slo_class, bound, length)
                    updates.append((*key, *self.coverage.summary(key)))
        return len(parsed), updates

    # -- compound jobs ------------------------------------------------------------------------------
    def _learn_jobs(self, now: float | None) -> int:
        jobs = self.jobs.finished(now)
        for app, graph in jobs:
            self.graphs.add(app, graph)
        return len(jobs)

    def learn_jobs(self, now: float | None = None) -> int:
        """Move the jobs quiet at ``now`` (default: the wall clock) into the graph store; the worker calls it
        once it has read the stream to its end."""
        with self.lock:
            return self._learn_jobs(time.time() if now is None else now)

    def estimate_job(self, app: str, stage: int, history: JobGraph, stage_prompts: Sequence[int]) -> GraphEstimate:
        with self.lock:  # matching marks the graphs it used (their freshness); the worker adds graphs
            return self.graphs.estimate(app, stage, history, stage_prompts)
