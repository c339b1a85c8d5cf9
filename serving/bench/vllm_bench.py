"""``tempo bench --engine vllm``: the same workload replayed on the real engine under each policy.

For every repeat and policy (the policy order rotates between repeats, so drift spreads over all of them)
a fresh ``tempo serve`` is started (or a running one at ``--url`` is used, one policy), warmed up, the
workload replayed (``engine_client``) and the outcomes accounted exactly as the simulator's are
(``tempo.scheduler.goodput.account``: same window, same definitions). The engine's own figures come from
the deltas of ``/metrics`` over the replay: decisions and their time, preemptions (by the policy, by the
engine), rejections, front-end refusals.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tempo.scheduler.goodput import account
from tempo.scheduler.slo import SLOClass
from tempo.serving.bench.engine_client import ReplayConfig, ReplayResult, replay, scrape_metrics
from tempo.serving.vllm.launch import ManagedServer
from tempo.serving.workloads.format import WorkloadRequest

SERVED_NAMES = {"tiny": "tiny-llama", "smollm2": "SmolLM2-135M-Instruct"}


@dataclass
class EngineBenchConfig:
    policies: list[str]
    model: str = "tiny"
    repeats: int = 1
    natural_lengths: bool = False
    decode_weight: float = 1.0
    serve_args: list[str] = field(default_factory=list)  # extra `tempo serve` options (and `-- vLLM args`)
    url: str | None = None  # a running server instead (one policy: whatever it serves)
    logs: Path = Path("out/bench-vllm-logs")


def window_of(workload: Sequence[WorkloadRequest]) -> float:
    arrivals = [w.arrival_s for w in workload]
    return max(1e-9, max(arrivals) - min(arrivals)) if arrivals else 1.0


def _delta(after: dict[str, float], before: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def summarize_run(policy: str, repeat: int, workload: Sequence[WorkloadRequest], result: ReplayResult,
                  before: dict[str, float], after: dict[str, float], decode_weight: float) -> dict[str, Any]:
    window = window_of(workload)
    report = account(result.outcomes, decode_weight=decode_weight, duration_s=window)
    end = window + min(w.arrival_s for w in workload)
    within = 0.0
    for o in result.outcomes:
        on = [t for t in o.token_times_s if t <= end]
        if on:
            within += o.prompt_tokens + decode_weight * len(on)
    decisions = _delta(after, before, "tempo_policy_decisions_total")
    decision_s = _delta(after, before, "tempo_policy_decision_seconds_sum")
    per_class = {c: {"units": r["units"], "met": r["met"], "attainment": r["attainment"],
                     "good_tokens": r["good_tokens"], "ttft_p99_s": r["ttft_s"]["p99"], "tbt_p99_s": r["tbt_s"]["p99"],
                     "e2e_p50_s": r["e2e_s"]["p50"], "e2e_p90_s": r["e2e_s"]["p90"]}
                 for c, r in report.to_dict()["per_class"].items()}
    return {
        "policy": policy, "repeat": repeat, "window_s": window, "wall_s": round(result.wall_s, 2),
        "token_goodput": report.token_goodput, "request_goodput": report.request_goodput,
        "raw_throughput": within / window, "delivered_throughput": report.raw_throughput,
        "per_class": per_class,
        "client": {"refused": result.refused, "rejected": result.rejected, "errors": result.errors,
                   "never_sent": result.never_sent},
        "engine": {
            "decisions": decisions,
            "decision_mean_ms": 1000 * decision_s / decisions if decisions else None,
            "policy_preemptions": _delta(after, before, 'tempo_preemptions_total{by="policy"}'),
            "engine_preemptions": _delta(after, before, 'tempo_preemptions_total{by="engine"}'),
            "vllm_preemptions": _delta(after, before, "vllm:num_preemptions_total"),
            "rejections": _delta(after, before, "tempo_rejections_total"),
            "demotions": _delta(after, before, "tempo_demotions_total"),
            "demotions_by_class": {c.value: n for c in SLOClass if (n := _delta(
                after, before, f'tempo_demotions_total{{slo_class="{c.value}"}}'))},
            "paced_skips": _delta(after, before, "tempo_paced_skips_total"),
            "refused": _delta(after, before, "tempo_refused_total"),
        },
    }


def _warm_up(url: str, model: str) -> None:
    import httpx

    for _ in range(3):
        httpx.post(f"{url}/v1/completions", timeout=120, json={
            "model": model, "prompt": [101] * 64, "max_tokens": 8, "ignore_eos": True,
            "vllm_xargs": {"slo_class": "best_effort"}}).raise_for_status()


def run_engine_bench(workload: Sequence[WorkloadRequest], config: EngineBenchConfig,
                     on_progress: Callable[[str, float], None] | None = None) -> dict[str, Any]:
    """Every policy on the same workload, ``repeats`` times, interleaved; the runs and their medians."""
    served = SERVED_NAMES.get(config.model, Path(config.model).name)
    runs: list[dict[str, Any]] = []
    policies = list(config.policies) if config.url is None else [config.policies[0]]
    for repeat in range(config.repeats):
        order = policies[repeat % len(policies):] + policies[:repeat % len(policies)]
        for policy in order:
            label = f"{policy} (repeat {repeat + 1}/{config.repeats})"
            def tick(label: str = label, done: list[int] = [0]) -> None:  # noqa: B006  (one counter per run)
                done[0] += 1
                if on_progress is not None:
                    on_progress(label, done[0] / len(workload))

            if config.url is not None:
                runs.append(_one(config.url, served, policy, repeat, workload, config, tick))
                continue
            log = config.logs / f"{policy.replace('@', '_')}-{repeat}.log"
            with ManagedServer(["--model", config.model, "--policy", policy, *config.serve_args], log) as server:
                runs.append(_one(server.url, served, policy, repeat, workload, config, tick))
    return {"runs": runs, "medians": medians(runs)}


def _one(url: str, served: str, policy: str, repeat: int, workload: Sequence[WorkloadRequest],
         config: EngineBenchConfig, tick: Callable[[], None]) -> dict[str, Any]:
    _warm_up(url, served)
    time.sleep(1.0)
    before = asyncio.run(scrape_metrics(url))
    result = asyncio.run(replay(workload, ReplayConfig(url, served, config.natural_lengths), progress=tick))
    time.sleep(1.5)  # the engine's metrics are written off the step loop
    after = asyncio.run(scrape_metrics(url))
    return summarize_run(policy, repeat, workload, result, before, after, config.decode_weight)


def medians(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per policy: the median of each headline figure over repeats, and its ratio to FCFS's in each repeat
    (the ratio measured within one repeat, then the median of the ratios)."""
    out: dict[str, dict[str, Any]] = {}
    by_policy: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_policy.setdefault(run["policy"], []).append(run)
    fcfs = {r["repeat"]: r for r in by_policy.get("fcfs", [])}
    for policy, rs in by_policy.items():
        row: dict[str, Any] = {"repeats": len(rs)}
        for key in ("token_goodput", "request_goodput", "raw_throughput"):
            row[key] = statistics.median(r[key] for r in rs)
            ratios = [r[key] / fcfs[r["repeat"]][key] for r in rs
                      if r["repeat"] in fcfs and fcfs[r["repeat"]][key] > 0]
            row[f"{key}_vs_fcfs"] = statistics.median(ratios) if ratios else None
        classes = {c for r in rs for c in r["per_class"]}
        row["attainment"] = {c: statistics.median(r["per_class"][c]["attainment"] or 0.0 for r in rs
                                                  if c in r["per_class"]) for c in sorted(classes)}
        row["decision_mean_ms"] = statistics.median(r["engine"]["decision_mean_ms"] or 0.0 for r in rs)
        out[policy] = row
    return out
