"""Prometheus metrics of one app instance (its own registry, so several apps can live in one process)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("tempo_estimator_requests_total", "HTTP requests", ["endpoint", "status"], registry=r)
        self.latency = Histogram("tempo_estimator_request_seconds", "HTTP request latency", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.estimates = Counter("tempo_estimator_estimates_total", "bounds served, by source", ["source"],
                                 registry=r)
        self.coverage = Gauge("tempo_estimator_coverage",
                              "share of recent completions within the bound they were served", ["model", "slo_class"],
                              registry=r)
        self.overestimation = Gauge("tempo_estimator_overestimation",
                                    "mean bound / true length of recent completions", ["model", "slo_class"],
                                    registry=r)
        self.online_updates = Counter("tempo_estimator_online_updates_total",
                                      "completions applied to the online learner", registry=r)
        self.completions = Counter("tempo_estimator_completions_total", "completion records received", ["result"],
                                   registry=r)
        self.model_info = Gauge("tempo_estimator_model_info", "the served model version (value 1)", ["version"],
                                registry=r)
        self.redis_up = Gauge("tempo_estimator_redis_up", "1 while Redis answers", registry=r)

    def set_model(self, version: str | None) -> None:
        self.model_info.clear()
        self.model_info.labels(version or "none").set(1)

    def applied(self, updates: list[tuple[str, str, float, float]], count: int) -> None:
        self.online_updates.inc(count)
        for model, slo_class, coverage, over in updates:
            self.coverage.labels(model, slo_class).set(coverage)
            self.overestimation.labels(model, slo_class).set(over)


class MetricsMiddleware:
    """Pure ASGI middleware: counts and times every HTTP request by route template (bounded labels)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
