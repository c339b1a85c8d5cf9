"""A compound call's job outlook from the estimator service (``POST /v1/jobs:estimate``), the engine's own
graph store when the service cannot answer in time.

The service matches against the graphs of every job its worker learned from the completion records in
Redis: those of every ``tempo serve`` replica, kept across restarts. The engine's in-process store
(``LocalBounds.job_graphs``) learns only the jobs this engine served since it started; it answers when the
service is not configured, slow, down, or says something the policy cannot use.

The policy asks once per (job, stage, calls released in the stage) (``RequestTable`` caches the answer),
inside its decision: a synchronous call with a hard timeout, so a slow service costs a decision at most
``timeout_s``. After a failure (no answer in time, a 5xx, an answer the policy cannot use) the service is not
asked for ``cooldown_s``: a service that is down costs one timeout per cooldown, not one per stage. A 4xx
refuses one job's figures, not the service: that job is answered locally, the next one is asked again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx
from tempo.scheduler.jobs import JobGraph, JobOutlookSource, StageOutlook

log = logging.getLogger("tempo.serving.vllm")

SERVICE, LOCAL = "service", "local"


class ServiceJobOutlook:
    """``JobOutlookSource`` over the service; ``local`` answers when it cannot (see the module docstring).

    ``answered[source]`` counts the outlooks each source gave; ``on_answer(source, seconds)`` is told of each
    (the engine's Prometheus metrics)."""

    def __init__(self, url: str, local: JobOutlookSource, timeout_s: float = 0.05, cooldown_s: float = 5.0,
                 http: httpx.Client | None = None, clock: Callable[[], float] = time.monotonic,
                 on_answer: Callable[[str, float], None] | None = None) -> None:
        if timeout_s <= 0 or cooldown_s < 0:
            raise ValueError("timeout_s must be > 0 and cooldown_s >= 0")
        self.local = local
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.on_answer = on_answer
        self.http = http or httpx.Client(base_url=url, timeout=httpx.Timeout(timeout_s))
        self.answered = {SERVICE: 0, LOCAL: 0}
        self._quiet_until = float("-inf")  # no call to the service before then (it failed)

    def outlook(self, app: str, stage: int, history: JobGraph = (), stage_prompts: Sequence[int] = ()) -> StageOutlook:
        started = self.clock()
        found = self._ask(app, stage, history, stage_prompts) if started >= self._quiet_until else None
        source = SERVICE if found is not None else LOCAL
        if found is None:
            found = self.local.outlook(app, stage, history, stage_prompts)
        self.answered[source] += 1
        if self.on_answer is not None:
            self.on_answer(source, self.clock() - started)
        return found

    def _ask(self, app: str, stage: int, history: JobGraph, stage_prompts: Sequence[int]) -> StageOutlook | None:
        if len(history) < stage:  # the engine lost part of the job (evicted): the service would refuse it
            return None
        body = {"app": app, "stage": stage, "history": [[list(call) for call in calls] for calls in history[:stage]],
                "stage_prompts": list(stage_prompts)}
        try:
            response = self.http.post("/v1/jobs:estimate", json=body)
            if 400 <= response.status_code < 500:  # this job's figures are outside the service's schema
                log.info("tempo: job outlook refused by the estimator service (%d): %s", response.status_code,
                         response.text[:200])
                return None
            response.raise_for_status()
            return outlook_from_answer(response.json())
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            self._quiet_until = self.clock() + self.cooldown_s
            log.warning("tempo: job outlook from the engine's own graphs for %.0f s (estimator service: %s)",
                        self.cooldown_s, str(exc)[:200] or type(exc).__name__)
            return None

    def close(self) -> None:
        self.http.close()


def outlook_from_answer(answer: dict[str, Any]) -> StageOutlook:
    """A ``JobEstimateResponse`` as the policy reads it; ValueError when it is not one."""
    counts = {k: int(answer[k]) for k in ("stages_after", "decode_tokens_after", "prefill_tokens_after")}
    totals = {k: float(answer[k]) for k in ("tokens_after", "prefill_total_after", "decode_total_after")}
    phi = answer.get("sub_deadline_fraction")
    if min(counts.values()) < 0 or min(totals.values()) < 0 or not all(t < float("inf") for t in totals.values()):
        raise ValueError(f"an outlook the policy cannot use: {answer}")
    if phi is not None and not 0.0 <= float(phi) <= 1.0:
        raise ValueError(f"sub-deadline fraction {phi} outside [0, 1]")
    return StageOutlook(**counts, **totals, samples=round(float(answer["matched_jobs"])),
                        sub_deadline_fraction=None if phi is None else float(phi))
