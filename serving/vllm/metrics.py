"""Tempo's Prometheus metrics, served on ``tempo serve``'s ``/metrics`` beside vLLM's.

The engine core (a separate process) and the API server both write metrics; ``tempo serve`` runs vLLM
with ``PROMETHEUS_MULTIPROC_DIR`` set to a fresh directory, so vLLM's own ``/metrics`` handler (which
uses a ``MultiProcessCollector`` then) serves every process's values. Without it (an engine in a test
process) the metrics live in the default registry.

Per class (``slo_class``): finished requests by outcome, good tokens (the goodput numerator: tokens
within their SLO, counted as ``tempo.scheduler.goodput`` does; a compound *call* counts when it is done by
its job's deadline), delivered tokens, and the bound's coverage (finished requests whose output stayed
within the initial bound), plus rolling attainment and coverage over the last ``WINDOW`` requests.
Engine side: decisions and their time, preemptions by whom, rejections and demotions by class, skipped
steps, completion records by fate, compound-job outlooks by source. Front end: estimator calls by result,
refused and bad requests, the garbage collector's pauses and the event loop's lag.
"""

from __future__ import annotations

from collections import defaultdict, deque
from functools import lru_cache
from typing import Any

WINDOW = 200  # requests per class behind the rolling gauges
PAUSE_BUCKETS = (1e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)  # seconds the API server stands still


class EngineMetrics:
    """Metrics the engine core writes (from the completion writer's thread and the step loop)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.finished = Counter("tempo_requests_finished", "Finished requests by class and outcome "
                                "(met, missed, rejected, aborted, best_effort).", ["slo_class", "outcome"])
        self.good_tokens = Counter("tempo_good_tokens", "Tokens delivered within their SLO (goodput).",
                                   ["slo_class"])
        self.tokens = Counter("tempo_tokens", "Prompt + output tokens of finished requests.", ["slo_class"])
        self.bound_checked = Counter("tempo_bound_checked", "Completed requests whose bound was checked.",
                                     ["slo_class"])
        self.bound_covered = Counter("tempo_bound_covered", "Completed requests within their initial bound.",
                                     ["slo_class"])
        self.attainment = Gauge("tempo_slo_attainment", f"SLO attainment over the last {WINDOW} requests.",
                                ["slo_class"], multiprocess_mode="mostrecent")
        self.coverage = Gauge("tempo_bound_coverage", f"Bound coverage over the last {WINDOW} requests.",
                              ["slo_class"], multiprocess_mode="mostrecent")
        self.decisions = Counter("tempo_policy_decisions", "Policy decisions.")
        self.policy_errors = Counter("tempo_policy_errors", "Policy decisions that raised: the step kept the "
                                     "last plan (the engine keeps serving; the log has the traceback).")
        self.decision_seconds = Histogram("tempo_policy_decision_seconds", "Time of a policy decision.",
                                          buckets=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0))
        self.preemptions = Counter("tempo_preemptions", "Preemptions (recompute) by who asked.", ["by"])
        self.rejections = Counter("tempo_rejections", "Requests rejected by the policy.", ["slo_class"])
        self.demotions = Counter("tempo_demotions", "Requests demoted to best effort by the policy, by class.",
                                 ["slo_class"])
        self.skips = Counter("tempo_paced_skips", "Resident-steps a running request was skipped (paused or "
                             "ahead of its pace).")
        self.records = Counter("tempo_completion_records", "Completion records by fate.", ["state"])
        self.job_outlooks = Counter("tempo_job_outlooks", "Compound-job outlooks by source (service: the "
                                    "estimator's /v1/jobs:estimate; local: the engine's own graphs).", ["source"])
        self.job_outlook_seconds = Histogram("tempo_job_outlook_seconds", "Time to get a job outlook (inside "
                                             "a policy decision).", buckets=(1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1))
        self._recent: dict[str, deque[tuple[bool, bool | None]]] = defaultdict(lambda: deque(maxlen=WINDOW))

    def observe_job_outlook(self, source: str, seconds: float) -> None:
        self.job_outlooks.labels(source).inc()
        self.job_outlook_seconds.observe(seconds)

    def observe_record(self, record: dict[str, Any]) -> None:
        cls = str(record.get("slo_class"))
        reason = record.get("finish_reason")
        met = record.get("slo_met")
        outcome = ("rejected" if reason == "rejected" else "aborted" if reason not in ("stop", "length")
                   else "best_effort" if met is None else "met" if met else "missed")
        self.finished.labels(cls, outcome).inc()
        self.good_tokens.labels(cls).inc(int(record.get("good_tokens") or 0))
        self.tokens.labels(cls).inc(int(record.get("prompt_tokens", 0)) + int(record.get("output_tokens", 0)))
        covered: bool | None = None
        if reason in ("stop", "length") and record.get("bound"):
            covered = int(record["output_tokens"]) <= int(record["bound"])
            self.bound_checked.labels(cls).inc()
            if covered:
                self.bound_covered.labels(cls).inc()
        if met is not None:
            window = self._recent[cls]
            window.append((bool(met), covered))
            self.attainment.labels(cls).set(sum(m for m, _ in window) / len(window))
            checked = [c for _, c in window if c is not None]
            if checked:
                self.coverage.labels(cls).set(sum(checked) / len(checked))


class FrontendMetrics:
    """Metrics the API server's middleware writes."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.estimates = Counter("tempo_estimator_calls", "Ladders asked of the estimator, by result "
                                 "(ok, fallback, local).", ["result"])
        self.estimate_seconds = Histogram("tempo_estimator_call_seconds", "Time to get a request's ladder.",
                                          buckets=(5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.2))
        self.refused = Counter("tempo_refused", "Requests refused before any work, by reason.", ["reason"])
        self.bad_requests = Counter("tempo_bad_requests", "Requests answered 400 for bad SLO fields.")
        self.gc_pause_seconds = Histogram("tempo_gc_pause_seconds", "The API server's garbage-collector pauses "
                                          "(its event loop stands still), by generation.", ["generation"],
                                          buckets=PAUSE_BUCKETS)
        self.loop_lag_seconds = Histogram("tempo_event_loop_lag_seconds", "How late the API server's event "
                                          "loop woke a 20 ms timer: what a request arriving then waited "
                                          "before any of it ran.", buckets=PAUSE_BUCKETS)
        self.loop_lag_max = Gauge("tempo_event_loop_lag_max_seconds", "The longest event-loop lag so far.",
                                  multiprocess_mode="max")


@lru_cache(maxsize=1)
def engine_metrics() -> EngineMetrics:
    return EngineMetrics()


@lru_cache(maxsize=1)
def frontend_metrics() -> FrontendMetrics:
    return FrontendMetrics()
