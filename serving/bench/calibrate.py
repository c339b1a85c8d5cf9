"""SLOs calibrated to the engine that serves them: absolute GPU-sized SLOs (0.1 s TBT, 20 s deadlines) mean
nothing on a two-core CPU engine, so the benchmark measures the engine unloaded and sets the base SLOs as
stated multiples of what it measured:

- unloaded TTFT by prompt length (one request at a time, one output token; a line fitted to the medians),
- unloaded inter-token time (one request decoding; the median of three),
- FCFS saturation: the engine's sustained token throughput under overload (``quick``: a burst of concurrent
  requests instead), divided by the workload's mean tokens per arrival;

then TBT = ``tbt_x`` x the inter-token time, TTFT = ``ttft_x`` x the unloaded TTFT of a median chat prompt,
deadline = ``deadline_x`` x the unloaded time of a median deadline request, compound stage deadline =
``stage_x`` x the median unloaded critical path per stage of the jobs. The JSON is written once and
reused by the runs (and printed by the report). No SLO is set below ``MIN_SLO_S``, the shortest the server
accepts.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import httpx
from tempo.scheduler.slo import SLOClass
from tempo.serving.bench.engine_client import ReplayConfig, replay, served_prompt_tokens, synthetic_prompt
from tempo.serving.vllm.slo_fields import MIN_SLO_S
from tempo.serving.workloads.format import WorkloadRequest


@dataclass(frozen=True)
class Multiples:
    ttft_x: float = 5.0
    tbt_x: float = 3.0
    deadline_x: float = 3.0
    stage_x: float = 2.0


async def _first_token_s(http: httpx.AsyncClient, model: str, prompt: list[int], outputs: int) -> list[float]:
    """Seconds from sending to each output token of one streamed request."""
    started = time.perf_counter()
    times: list[float] = []
    body = {"model": model, "prompt": prompt, "max_tokens": outputs, "ignore_eos": True, "stream": True,
            "temperature": 0.0, "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            "vllm_xargs": {"slo_class": "best_effort"}}
    count = 0
    async with http.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                usage = json.loads(line[6:]).get("usage") or {}
                total = int(usage.get("completion_tokens") or count)
                now = time.perf_counter() - started
                times.extend([now] * (total - count))
                count = max(count, total)
    return times


def _line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var > 0 else 0.0
    return max(0.0, my - slope * mx), max(0.0, slope)


def workload_medians(workload: Sequence[WorkloadRequest], max_model_len: int = 4096) -> dict[str, float]:
    """Median prompt / output lengths of chat and deadline requests and the jobs' per-stage critical path
    (prompts as the replay sends them)."""
    workload = [w.model_copy(update={"prompt_tokens": served_prompt_tokens(w, max_model_len)}) for w in workload]
    chat = [w for w in workload if w.slo_class is SLOClass.LATENCY]
    dl = [w for w in workload if w.slo_class is SLOClass.DEADLINE]
    jobs: dict[str, dict[int, list[WorkloadRequest]]] = {}
    for w in workload:
        if w.job_id is not None:
            jobs.setdefault(w.job_id, {}).setdefault(w.stage or 0, []).append(w)
    per_stage = [(statistics.median(max(c.prompt_tokens for c in calls) for calls in stages.values()),
                  statistics.median(max(c.output_tokens for c in calls) for calls in stages.values()))
                 for stages in jobs.values()]
    return {
        "chat_prompt": statistics.median(w.prompt_tokens for w in chat) if chat else 256.0,
        "deadline_prompt": statistics.median(w.prompt_tokens for w in dl) if dl else 256.0,
        "deadline_output": statistics.median(w.output_tokens for w in dl) if dl else 256.0,
        "stage_prompt": statistics.median(p for p, _ in per_stage) if per_stage else 1024.0,
        "stage_output": statistics.median(o for _, o in per_stage) if per_stage else 256.0,
        "tokens_per_arrival": sum(w.prompt_tokens + w.output_tokens for w in workload)
        / max(1, len({w.job_id or w.id for w in workload})),
    }


async def measure_engine(url: str, model: str, max_prompt: int = 1800, burst: int = 32) -> dict[str, Any]:
    """Unloaded TTFT by prompt length (a line through them), the inter-token time, a burst's throughput."""
    nonce = os.urandom(4).hex()  # prompts of their own: a prefix cached by an earlier run would hide the prefill
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        await _first_token_s(http, model, synthetic_prompt(f"warm{nonce}", 64), 4)
        lengths = [p for p in (32, 256, 1024, 1800) if p <= max_prompt]
        ttfts: dict[int, float] = {}
        for p in lengths:
            ttfts[p] = statistics.median([
                (await _first_token_s(http, model, synthetic_prompt(f"t{p}{i}{nonce}", p), 1))[0] for i in range(3)])
        # the mean gap after the first token (the server may coalesce tokens into one chunk, so a median of
        # chunk gaps would read 0), the median of three: one stalled stream delivers its tokens at once
        itls = []
        for i in range(3):
            times = await _first_token_s(http, model, synthetic_prompt(f"itl{i}{nonce}", 64), 65)
            itls.append((times[-1] - times[0]) / max(1, len(times) - 1))
        itl = statistics.median(itls)
        started = time.perf_counter()
        await asyncio.gather(*(_first_token_s(http, model, synthetic_prompt(f"b{i}{nonce}", 256), 64)
                               for i in range(burst)))
        burst_tokens_per_s = burst * (256 + 64) / (time.perf_counter() - started)
    base, per_token = _line(list(ttfts), list(ttfts.values()))
    return {"ttft_by_prompt_s": {str(k): v for k, v in ttfts.items()}, "ttft_base_s": base,
            "ttft_per_prompt_token_s": per_token, "inter_token_s": itl, "burst": burst,
            "burst_tokens_per_s": burst_tokens_per_s}


def saturation_tokens_per_s(url: str, model: str, workload: Sequence[WorkloadRequest]) -> float:
    """FCFS's sustained token rate under heavy overload (tokens delivered between a third of the window and
    its end, per second), replaying an overloaded version of the workload."""
    arrivals = [w.arrival_s for w in workload]
    start, end = min(arrivals) + (max(arrivals) - min(arrivals)) / 3, max(arrivals)
    result = asyncio.run(replay(workload, ReplayConfig(url, model, stop_at_s=end + 1.0)))  # the backlog is not needed
    tokens = 0
    for seen in result.observed.values():  # finished or not: every token delivered in the window counts
        tokens += sum(1 for t in seen.token_times_s if start <= t <= end)
        if seen.token_times_s and start <= seen.token_times_s[0] <= end:
            tokens += seen.prompt_tokens
    return tokens / max(1e-9, end - start)


def calibrate(url: str, model: str, workload: Sequence[WorkloadRequest], multiples: Multiples = Multiples(),
              max_prompt: int = 1800, burst: int = 32, max_model_len: int = 4096,
              overload: Sequence[WorkloadRequest] | None = None,
              measured: dict[str, Any] | None = None) -> dict[str, Any]:
    """The measurements, the base SLOs they give, and the FCFS saturation rate (see the module doc).

    ``overload``: a heavily overloaded workload to measure saturation on (the server must run FCFS); without
    it, the burst's throughput stands in (``quick``). ``measured``: an earlier call's measurements, reused.
    """
    if measured is None:
        measured = asyncio.run(measure_engine(url, model, max_prompt, burst))
    med = workload_medians(workload, max_model_len)

    def ttft(p: float) -> float:
        return float(measured["ttft_base_s"] + measured["ttft_per_prompt_token_s"] * min(p, max_prompt))

    itl = float(measured["inter_token_s"])
    slo = {k: max(MIN_SLO_S, v) for k, v in {  # never below the shortest SLO tempo serve accepts
        "ttft_s": multiples.ttft_x * ttft(med["chat_prompt"]),
        "tbt_s": multiples.tbt_x * itl,
        "deadline_s": multiples.deadline_x * (ttft(med["deadline_prompt"]) + med["deadline_output"] * itl),
        "stage_deadline_s": multiples.stage_x * (ttft(med["stage_prompt"]) + med["stage_output"] * itl),
    }.items()}
    if overload is not None:
        sustained = saturation_tokens_per_s(url, model, overload)
        method = "FCFS overloaded replay (tokens delivered over the last two thirds of the window)"
    else:
        sustained = float(measured["burst_tokens_per_s"])
        method = f"a burst of {burst} concurrent requests (quick estimate)"
    return {"measured": measured, "workload_medians": med, "multiples": asdict(multiples), "slo": slo,
            "saturation": {"tokens_per_s": sustained, "tokens_per_arrival": med["tokens_per_arrival"],
                           "rps": sustained / med["tokens_per_arrival"], "method": method}}
