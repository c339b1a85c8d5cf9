"""Summary of a workload: rate, class mix, length percentiles and the compound jobs' stage structure."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
from tempo.scheduler.slo import SLOClass
from tempo.serving.workloads.format import WorkloadRequest

PERCENTILES = (50, 90, 99)


def length_summary(values: Sequence[int]) -> dict[str, float]:
    """count, mean, p50/p90/p99 and max of token counts."""
    if not values:
        return {"count": 0}
    arr = np.asarray(values, dtype=float)
    out: dict[str, float] = {"count": len(arr), "mean": round(float(arr.mean()), 1)}
    out.update({f"p{q}": round(float(np.percentile(arr, q)), 1) for q in PERCENTILES})
    out["max"] = float(arr.max())
    return out


def stage_structure_errors(calls: Sequence[WorkloadRequest]) -> list[str]:
    """Problems with one job's calls: stages must be 0..S-1, each depending on the whole previous stage."""
    by_stage: dict[int, list[WorkloadRequest]] = defaultdict(list)
    for call in calls:
        by_stage[call.stage or 0].append(call)
    errors: list[str] = []
    stages = sorted(by_stage)
    if stages != list(range(len(stages))):
        errors.append(f"job {calls[0].job_id}: stages {stages} are not 0..{len(stages) - 1}")
    for stage in stages:
        previous = {c.id for c in by_stage.get(stage - 1, [])}
        for call in by_stage[stage]:
            if set(call.depends_on) != previous:
                errors.append(f"{call.id}: depends on {sorted(call.depends_on)}, expected stage {stage - 1}'s calls")
    if len({c.arrival_s for c in calls}) != 1 or len({c.job_deadline_s for c in calls}) != 1:
        errors.append(f"job {calls[0].job_id}: calls disagree on the job's arrival or deadline")
    return errors


def summarize(requests: Sequence[WorkloadRequest]) -> dict[str, Any]:
    """JSON-ready summary. The rate counts arrivals (a compound job is one) as (n - 1) / span."""
    jobs: dict[str, list[WorkloadRequest]] = defaultdict(list)
    singles: list[WorkloadRequest] = []
    for request in requests:
        if request.job_id is not None:
            jobs[request.job_id].append(request)
        else:
            singles.append(request)
    arrival_times = [r.arrival_s for r in singles] + [calls[0].arrival_s for calls in jobs.values()]
    arrivals_by_class = Counter(r.slo_class.value for r in singles)
    arrivals_by_class[SLOClass.COMPOUND.value] += len(jobs)
    n_arrivals = len(arrival_times)
    span = (max(arrival_times) - min(arrival_times)) if arrival_times else 0.0

    tiers_by_arrival: dict[str, list[int]] = defaultdict(list)
    for r in singles:
        tiers_by_arrival[r.slo_class.value].append(r.slo_tier)
    tiers_by_arrival[SLOClass.COMPOUND.value] = [calls[0].slo_tier for calls in jobs.values()]

    per_class: dict[str, Any] = {}
    for cls in SLOClass:
        members = [r for r in requests if r.slo_class is cls]
        if members:
            per_class[cls.value] = {
                "requests": len(members),
                "arrivals": arrivals_by_class[cls.value],
                "prompt_tokens": length_summary([r.prompt_tokens for r in members]),
                "output_tokens": length_summary([r.output_tokens for r in members]),
                "tiers": dict(sorted(Counter(tiers_by_arrival[cls.value]).items())),
            }
    structure_errors = [e for calls in jobs.values() for e in stage_structure_errors(calls)]
    stages = [1 + max(c.stage or 0 for c in calls) for calls in jobs.values()]
    fan_out = [n for calls in jobs.values() for n in Counter(c.stage for c in calls).values()]
    return {
        "requests": len(requests),
        "arrivals": n_arrivals,
        "span_s": round(span, 3),
        "rate_rps": round((n_arrivals - 1) / span, 4) if span > 0 else None,
        "mix": {c: round(n / n_arrivals, 4) for c, n in sorted(arrivals_by_class.items()) if n} if n_arrivals else {},
        "arrivals_by_class": {c: n for c, n in sorted(arrivals_by_class.items()) if n},
        "prompt_tokens": length_summary([r.prompt_tokens for r in requests]),
        "output_tokens": length_summary([r.output_tokens for r in requests]),
        "per_class": per_class,
        "apps": dict(Counter(r.app for r in requests).most_common()),
        "compound": {
            "jobs": len(jobs),
            "calls": sum(len(c) for c in jobs.values()),
            "stages_per_job": dict(sorted(Counter(stages).items())),
            "max_fan_out": max(fan_out, default=0),
            "stage_structure_ok": not structure_errors,
            "stage_structure_errors": structure_errors[:10],
        },
    }
