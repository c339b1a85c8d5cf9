"""Service goodput accounting (DESIGN section 1): which delivered tokens count, per request and per class.

- latency: token i counts when emitted by ``arrival + ttft + i * tbt`` (cumulative, so a fast start
  banks slack); the prompt tokens count when the first token meets its TTFT.
- deadline: all or nothing: prompt + output count when the whole response is done by the deadline.
- compound: all or nothing per job: every call's tokens count when all of the job's calls finished and
  the last one by ``job arrival + job_deadline``.
- best effort: never counts; its throughput is reported.

Decode tokens are weighted by ``decode_weight`` (default 1; the paper's code uses 8) and prompt tokens by 1,
in both the good and the delivered totals, so goodput never exceeds raw throughput.

The caller passes an outcome for every request of the workload, including rejected ones and compound
calls that were never released (``finished=False``, no tokens): a job with a missing call cannot count.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from typing import Any

from tempo.scheduler.slo import SLO, SLOClass

# Float slack when comparing an emission time with a due time computed as a sum of floats.
TIME_EPS_S = 1e-9


@dataclass(frozen=True, slots=True)
class RequestOutcome:
    """What the engine observed for one request: the input of the accounting."""

    request_id: str
    slo: SLO
    arrival_s: float  # when the request reached the engine (compound: when its stage was released)
    prompt_tokens: int
    token_times_s: tuple[float, ...] = ()  # absolute emission time of each output token, non-decreasing
    finished: bool = False  # every output token was delivered (False: rejected, aborted, unfinished)
    job_id: str | None = None  # compound: the job this call belongs to
    job_arrival_s: float | None = None  # compound: the job's arrival; defaults to this call's arrival

    def __post_init__(self) -> None:
        if self.prompt_tokens < 0:
            raise ValueError(f"{self.request_id}: prompt_tokens must be >= 0")
        times = self.token_times_s
        if times and times[0] < self.arrival_s - TIME_EPS_S:
            raise ValueError(f"{self.request_id}: a token was emitted before the request arrived")
        if any(b < a for a, b in pairwise(times)):
            raise ValueError(f"{self.request_id}: token times must be non-decreasing")
        if self.finished and not times:
            raise ValueError(f"{self.request_id}: a finished request has emitted at least one token")
        if self.slo.slo_class is SLOClass.COMPOUND and not self.job_id:
            raise ValueError(f"{self.request_id}: a compound call needs a job_id")

    @property
    def output_tokens(self) -> int:
        return len(self.token_times_s)

    @property
    def finish_s(self) -> float | None:
        return self.token_times_s[-1] if self.finished else None

    @property
    def job_start_s(self) -> float:
        return self.arrival_s if self.job_arrival_s is None else self.job_arrival_s


def delivered_tokens(outcome: RequestOutcome, decode_weight: float = 1.0) -> float:
    """Weighted tokens served: the prompt once a first token is out, plus every output token."""
    if not outcome.token_times_s:
        return 0.0
    return outcome.prompt_tokens + decode_weight * outcome.output_tokens


def latency_good_tokens(outcome: RequestOutcome, decode_weight: float = 1.0) -> float:
    """Latency class: weighted tokens emitted by their cumulative due time."""
    slo, times = outcome.slo, outcome.token_times_s
    if not times:
        return 0.0
    on_time = sum(1 for i, t in enumerate(times) if t <= slo.token_due_s(outcome.arrival_s, i) + TIME_EPS_S)
    first_on_time = times[0] <= slo.token_due_s(outcome.arrival_s, 0) + TIME_EPS_S
    return (outcome.prompt_tokens if first_on_time else 0) + decode_weight * on_time


def request_met(outcome: RequestOutcome) -> bool:
    """Whether a single (non-compound) request met its SLO; best effort never does."""
    slo, finish = outcome.slo, outcome.finish_s
    if finish is None:
        return False
    if slo.slo_class is SLOClass.LATENCY:
        return all(
            t <= slo.token_due_s(outcome.arrival_s, i) + TIME_EPS_S for i, t in enumerate(outcome.token_times_s)
        )
    if slo.slo_class is SLOClass.DEADLINE:
        assert slo.deadline_s is not None
        return finish <= outcome.arrival_s + slo.deadline_s + TIME_EPS_S
    if slo.slo_class is SLOClass.COMPOUND:
        raise ValueError("compound calls are judged per job: use job_met")
    return False


def job_met(calls: Sequence[RequestOutcome]) -> bool:
    """Whether a compound job met its deadline: every call finished, the last by the job deadline."""
    if not calls or any(c.finish_s is None for c in calls):
        return False
    deadline = calls[0].slo.job_deadline_s
    assert deadline is not None
    start = min(c.job_start_s for c in calls)
    return max(c.finish_s for c in calls if c.finish_s is not None) <= start + deadline + TIME_EPS_S


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation, as numpy's default."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(frozen=True, slots=True)
class LatencyStats:
    """Percentiles of one latency measure in seconds; None where there were no samples."""

    count: int
    p50: float | None
    p90: float | None
    p99: float | None

    @classmethod
    def of(cls, values: Sequence[float]) -> LatencyStats:
        if not values:
            return cls(0, None, None, None)
        return cls(len(values), percentile(values, 50), percentile(values, 90), percentile(values, 99))


@dataclass(frozen=True, slots=True)
class ClassReport:
    """One class's share of the run. ``units`` are requests, or jobs for the compound class."""

    slo_class: SLOClass
    units: int
    met: int
    attainment: float | None  # met / units; None for best effort (it has no SLO) or no units
    good_tokens: float
    delivered_tokens: float
    ttft_s: LatencyStats
    tbt_s: LatencyStats
    e2e_s: LatencyStats  # compound: job arrival to the job's last token


@dataclass(frozen=True, slots=True)
class GoodputReport:
    """The headline figures of a run plus the per-class breakdown."""

    duration_s: float
    decode_weight: float
    good_tokens: float
    delivered_tokens: float
    token_goodput: float  # good tokens / s: the headline "service goodput"
    request_goodput: float  # requests (compound: jobs) that met their SLO / s
    raw_throughput: float  # delivered tokens / s, whether good or not
    units: int  # requests + jobs with an SLO (best effort excluded)
    met: int
    per_class: dict[SLOClass, ClassReport] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: class keys by their wire name."""
        out = asdict(self)
        out["per_class"] = {
            c.value: {**asdict(r), "slo_class": c.value} for c, r in self.per_class.items()
        }
        return out


def _run_span_s(outcomes: Sequence[RequestOutcome]) -> float:
    start = min(o.arrival_s for o in outcomes)
    end = max((o.token_times_s[-1] for o in outcomes if o.token_times_s), default=start)
    return max(end, max(o.arrival_s for o in outcomes)) - start


def _per_token_stats(outcomes: Iterable[RequestOutcome]) -> tuple[list[float], list[float]]:
    ttft: list[float] = []
    tbt: list[float] = []
    for o in outcomes:
        times = o.token_times_s
        if times:
            ttft.append(times[0] - o.arrival_s)
            tbt.extend(b - a for a, b in pairwise(times))
    return ttft, tbt


def account(
    outcomes: Iterable[RequestOutcome],
    decode_weight: float = 1.0,
    duration_s: float | None = None,
) -> GoodputReport:
    """Goodput of a run. ``duration_s`` defaults to first arrival .. last token."""
    if decode_weight < 0:
        raise ValueError("decode_weight must be >= 0")
    items = list(outcomes)
    ids = [o.request_id for o in items]
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate request ids in outcomes")
    span = duration_s if duration_s is not None else (_run_span_s(items) if items else 0.0)

    by_class: dict[SLOClass, list[RequestOutcome]] = defaultdict(list)
    for o in items:
        by_class[o.slo.slo_class].append(o)

    per_class: dict[SLOClass, ClassReport] = {}
    for cls, members in by_class.items():
        delivered = sum(delivered_tokens(o, decode_weight) for o in members)
        ttft, tbt = _per_token_stats(members)
        if cls is SLOClass.COMPOUND:
            jobs: dict[str, list[RequestOutcome]] = defaultdict(list)
            for o in members:
                jobs[o.job_id or ""].append(o)
            met_jobs = [calls for calls in jobs.values() if job_met(calls)]
            good = sum(o.prompt_tokens + decode_weight * o.output_tokens for calls in met_jobs for o in calls)
            e2e = [
                max(c.token_times_s[-1] for c in calls) - min(c.job_start_s for c in calls)
                for calls in jobs.values()
                if all(c.finished for c in calls)
            ]
            units, met = len(jobs), len(met_jobs)
        else:
            flags = [request_met(o) for o in members]
            if cls is SLOClass.LATENCY:
                good = sum(latency_good_tokens(o, decode_weight) for o in members)
            else:
                good = sum(
                    o.prompt_tokens + decode_weight * o.output_tokens
                    for o, f in zip(members, flags, strict=True)
                    if f
                )
            e2e = [o.token_times_s[-1] - o.arrival_s for o in members if o.finished]
            units, met = len(members), sum(flags)
        attainment = None if cls is SLOClass.BEST_EFFORT or units == 0 else met / units
        per_class[cls] = ClassReport(
            slo_class=cls,
            units=units,
            met=met,
            attainment=attainment,
            good_tokens=float(good),
            delivered_tokens=float(delivered),
            ttft_s=LatencyStats.of(ttft),
            tbt_s=LatencyStats.of(tbt),
            e2e_s=LatencyStats.of(e2e),
        )

    good_total = sum(r.good_tokens for r in per_class.values())
    delivered_total = sum(r.delivered_tokens for r in per_class.values())
    slo_reports = [r for c, r in per_class.items() if c is not SLOClass.BEST_EFFORT]
    units_total = sum(r.units for r in slo_reports)
    met_total = sum(r.met for r in slo_reports)

    def rate(x: float) -> float:
        return x / span if span > 0 else 0.0

    ordered = {c: per_class[c] for c in SLOClass if c in per_class}
    return GoodputReport(
        duration_s=span,
        decode_weight=decode_weight,
        good_tokens=good_total,
        delivered_tokens=delivered_total,
        token_goodput=rate(good_total),
        request_goodput=rate(met_total),
        raw_throughput=rate(delivered_total),
        units=units_total,
        met=met_total,
        per_class=ordered,
    )
