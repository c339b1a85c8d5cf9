"""Bounds that need no service: per-(class, app) empirical ladders and the compound-job outlook, fitted
on the vendored data at start-up (~2 s, once per process).

The front end answers with them when no estimator service is configured, and as the flagged fallback
when the service is slow or down; the engine uses them for a request that reached it without a ladder
(e.g. through vLLM's offline API), and the pattern graphs of past jobs (per-app quantiles as the
fallback) for what Tempo expects of a compound call's job.
"""

from __future__ import annotations

from functools import cached_property, lru_cache

import numpy as np
from tempo.models.job_graphs import GraphStore
from tempo.scheduler.bounds import BoundLadder
from tempo.scheduler.jobs import JobProfile
from tempo.scheduler.slo import SLOClass
from tempo.serving.bounds.providers import EmpiricalProvider, fit_job_graphs, fit_job_profile, training_workload
from tempo.serving.workloads.builder import WorkloadSpec
from tempo.serving.workloads.format import WorkloadRequest


@lru_cache(maxsize=4)
def _training(bounds_model: str) -> tuple[WorkloadRequest, ...]:
    return tuple(training_workload(WorkloadSpec(rps=10.0, duration_s=600.0, model=bounds_model), []))


class LocalBounds:
    """Ladders by (class, app) from past completions, capped at the request's ``max_tokens``."""

    def __init__(self, bounds_model: str, quantile: float = 0.9, kind: str = "empirical") -> None:
        training = _training(bounds_model)
        completions = [(w.slo_class, w.app, w.output_tokens) for w in training]
        self.kind = kind
        self.empirical = EmpiricalProvider(quantile=quantile).fit(completions)
        lengths = [w.output_tokens for w in training]
        self.fixed = int(np.quantile(lengths, quantile, method="inverted_cdf"))
        self.quantile = quantile
        self.job_profile: JobProfile = fit_job_profile(training, quantile)
        self._training = training

    @cached_property
    def job_graphs(self) -> GraphStore:
        """The pattern graphs of the training jobs; the engine's adapter adds the served ones. Built on first
        use: the front end, which answers fallback ladders on the request path, never needs it."""
        return fit_job_graphs(self._training, self.quantile)

    def ladder(self, slo_class: SLOClass, app: str, max_tokens: int | None = None,
               fallback: bool = False) -> BoundLadder:
        if self.kind == "fixed":
            ladder = BoundLadder.fixed(self.fixed, self.quantile)
        else:
            ladder = self.empirical.ladder_for(slo_class, app)
        if max_tokens is not None:
            ladder = cap_ladder(ladder, max_tokens)
        if fallback and not ladder.fallback:
            ladder = BoundLadder(ladder.steps, ladder.quantile, fallback=True)
        return ladder


def cap_ladder(ladder: BoundLadder, max_tokens: int) -> BoundLadder:
    """The ladder with every bound at most ``max_tokens`` (a response never exceeds it)."""
    steps = [(k, min(b, max_tokens)) for k, b in ladder.steps if k < max_tokens]
    return BoundLadder(tuple(steps) or ((0, max(1, max_tokens)),), ladder.quantile, ladder.fallback)


@lru_cache(maxsize=4)
def local_bounds(bounds_model: str, quantile: float = 0.9, kind: str = "empirical") -> LocalBounds:
    return LocalBounds(bounds_model, quantile, kind)
