"""Compound jobs: what is likely left of a job after its current stage, for stage sub-deadlines.

Until dependency-graph matching exists (the estimator's pattern-graph matcher), a policy estimates the
rest of a job from per-app statistics of past jobs: for a call of stage ``s``, the q-quantile over past jobs
of the same app that reached stage ``s`` of the stages still to come and of their critical-path tokens (the
longest call of each later stage, since a stage's calls run in parallel). A high quantile is conservative:
it reserves time for the longest plausible tail, so the current stage gets an earlier sub-deadline.

The oracle gets the true graphs instead (``OracleTruth``), and nothing else does.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

# One job as the fitter sees it: stages of calls, each call (prompt tokens, output tokens).
JobGraph = Sequence[Sequence[tuple[int, int]]]


@dataclass(frozen=True, slots=True)
class StageOutlook:
    """What remains of a job after the stage a call belongs to."""

    stages_after: int = 0
    decode_tokens_after: int = 0  # sum over later stages of the longest call's output (critical path)
    prefill_tokens_after: int = 0  # sum over later stages of the longest call's prompt (critical path)
    tokens_after: float = 0.0  # prompt + output of every later call (what the job still delivers; mean)
    prefill_total_after: float = 0.0  # prompt tokens of every later call (engine work; mean)
    decode_total_after: float = 0.0  # output tokens of every later call (engine work; mean)
    samples: int = 0  # past jobs behind the figures (0: no data)
    # fraction of the job deadline by which this stage should be done (the matched graphs' cumulative
    # critical-path time through this stage over their total); None: the source does not say
    sub_deadline_fraction: float | None = None

    def time_s(self, per_token_s: float, prefill_s_per_token: float) -> float:
        """Seconds the rest of the job needs on the critical path at the given speeds."""
        return (
            self.prefill_tokens_after * prefill_s_per_token
            + (self.decode_tokens_after + self.stages_after) * per_token_s
        )


def quantile_up(values: Sequence[float], q: float) -> float:
    """The smallest value with at least a fraction ``q`` of ``values`` at or below it (conservative)."""
    if not values:
        raise ValueError("quantile of no values")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
    return ordered[index]


def outlook_of(graph: JobGraph, stage: int) -> StageOutlook:
    """The exact outlook of a known job graph after ``stage``."""
    later = [calls for calls in graph[stage + 1 :] if calls]
    return StageOutlook(
        stages_after=len(later),
        decode_tokens_after=sum(max(o for _, o in calls) for calls in later),
        prefill_tokens_after=sum(max(p for p, _ in calls) for calls in later),
        tokens_after=float(sum(p + o for calls in later for p, o in calls)),
        prefill_total_after=float(sum(p for calls in later for p, _ in calls)),
        decode_total_after=float(sum(o for calls in later for _, o in calls)),
        samples=1,
    )


class JobOutlookSource(Protocol):
    """Anything that estimates the rest of a compound job from what the job has shown so far.

    ``history`` holds the job's finished stages, each a sequence of its calls' ``(prompt, output)`` tokens;
    ``stage_prompts`` the prompt tokens of the current stage's calls (known once the stage is released).
    The per-app quantiles (``JobProfile``) ignore both; the pattern-graph store matches them against past jobs.
    """

    def outlook(self, app: str, stage: int, history: JobGraph = (), stage_prompts: Sequence[int] = ()) -> StageOutlook:
        ...


@dataclass(frozen=True)
class JobProfile:
    """Per-app, per-stage outlooks fitted on past jobs."""

    by_app: Mapping[str, tuple[StageOutlook, ...]] = field(default_factory=dict)
    quantile: float = 0.9

    def outlook(self, app: str, stage: int, history: JobGraph = (), stage_prompts: Sequence[int] = ()) -> StageOutlook:
        """The fitted quantiles of ``app`` at ``stage`` (``history`` and ``stage_prompts`` are not used)."""
        stages = self.by_app.get(app)
        if not stages:
            return StageOutlook()
        if stage < len(stages):
            return stages[stage]
        return StageOutlook(samples=stages[-1].samples)  # past every job seen: assume this is the last stage

    @classmethod
    def fit(cls, jobs: Iterable[tuple[str, JobGraph]], quantile: float = 0.9) -> JobProfile:
        """From ``(app, graph)`` pairs of finished jobs."""
        if not 0 < quantile < 1:
            raise ValueError("quantile must be in (0, 1)")
        per_stage: dict[str, dict[int, list[StageOutlook]]] = defaultdict(lambda: defaultdict(list))
        for app, graph in jobs:
            for stage in range(len(graph)):
                per_stage[app][stage].append(outlook_of(graph, stage))
        by_app: dict[str, tuple[StageOutlook, ...]] = {}
        for app, stages in per_stage.items():
            outlooks = []
            for stage in range(max(stages) + 1):
                seen = stages.get(stage, [])
                if not seen:
                    outlooks.append(StageOutlook())
                    continue
                outlooks.append(
                    StageOutlook(
                        stages_after=int(quantile_up([o.stages_after for o in seen], quantile)),
                        decode_tokens_after=int(quantile_up([o.decode_tokens_after for o in seen], quantile)),
                        prefill_tokens_after=int(quantile_up([o.prefill_tokens_after for o in seen], quantile)),
                        tokens_after=sum(o.tokens_after for o in seen) / len(seen),
                        prefill_total_after=sum(o.prefill_total_after for o in seen) / len(seen),
                        decode_total_after=sum(o.decode_total_after for o in seen) / len(seen),
                        samples=len(seen),
                    )
                )
            by_app[app] = tuple(outlooks)
        return cls(by_app, quantile)


@dataclass(frozen=True)
class OracleTruth:
    """True lengths and job graphs, for the oracle policy only (the engine builds it from the workload)."""

    lengths: Mapping[str, int] = field(default_factory=dict)  # request id -> true output tokens
    jobs: Mapping[str, tuple[tuple[tuple[int, int], ...], ...]] = field(default_factory=dict)  # job id -> graph

    def outlook(self, job_id: str, stage: int) -> StageOutlook:
        graph = self.jobs.get(job_id)
        return outlook_of(graph, stage) if graph else StageOutlook()
