"""The learning loop on a real model's own lengths (``tempo bench --engine vllm --learning-loop``).

The estimator service starts from a length model trained on *other* LLMs' lengths (the vendored CASTILLO
file; the served model, SmolLM2-135M-Instruct, is in none of it). ``tempo serve`` asks it for every
request's ladder and writes every completion to Redis; the service's online learner (River and the
adaptive calibrator) learns from that stream as it goes, and a retraining job runs part-way (its candidate
is activated only when not worse than the active model on held-back completions). CASTILLO chat and code
prompts (the test split) are sent at a fixed concurrency, the model answering in its own words (natural
lengths, capped at ``max_tokens``); no restart anywhere.

From the stream, in completion order: rolling coverage of the served initial bound and reserved tokens per
used token (see ``rolling``). Then (``compare``) the bounds at work in scheduling: the demo's overloaded mix
replayed under Tempo three times, with bounds from (a) the estimator that has just learned the served model,
(b) the per-(class, app) empirical ladders of another LLM's lengths, (c) one fixed bound (both local, no
service), one server after another in the same stack.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from tempo.data.castillo import load_length_rows, load_prompts, prompt_split
from tempo.serving.bench.vllm_bench import SERVED_NAMES
from tempo.serving.vllm.launch import ManagedServer
from tempo.serving.vllm.stack import EstimatorService, LocalRedis, Stack, bootstrap_artifact

from tempo.demo import replay_variants

CHAT = ("Alpaca", "DollyDataset", "ShareGPT")
CODE = ("Apps", "BigCodeBench", "DS1000", "Mbpp")


def loop_prompts(n: int, seed: int = 0, max_chars: int = 3000) -> list[tuple[str, str, str]]:
    """(class, app, text) of ``n`` CASTILLO test-split prompts, chat as latency and code as deadline."""
    texts = load_prompts()
    seen: dict[str, tuple[str, str, str]] = {}
    for row in load_length_rows():
        if row.prompt_id in seen or prompt_split(row.prompt_id) != "test":
            continue
        text = texts.get(row.prompt_id)
        if not text or len(text) > max_chars:
            continue
        cls = "latency" if row.dataset in CHAT else "deadline" if row.dataset in CODE else None
        if cls is not None:
            seen[row.prompt_id] = (cls, f"{'chat' if cls == 'latency' else 'code'}/{row.dataset}", text)
    items = sorted(seen.values())
    random.Random(seed).shuffle(items)
    return items[:n]


async def _drive(url: str, model: str, prompts: list[tuple[str, str, str]], concurrency: int, max_tokens: int,
                 on_done: Callable[[int], None]) -> None:
    queue: asyncio.Queue[tuple[int, tuple[str, str, str]]] = asyncio.Queue()
    for item in enumerate(prompts):
        queue.put_nowait(item)
    done = [0]

    async def worker(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            i, (cls, app, text) = queue.get_nowait()
            xargs: dict[str, Any] = {"slo_class": cls, "app": app}
            xargs.update({"ttft_slo_s": 60.0, "tbt_slo_s": 5.0} if cls == "latency" else {"deadline_s": 600.0})
            await http.post("/v1/chat/completions", headers={"X-Request-Id": f"loop-{i}"}, json={
                "model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
                "temperature": 0.0, "vllm_xargs": xargs})
            done[0] += 1
            on_done(done[0])

    async with httpx.AsyncClient(base_url=url, timeout=3600) as http:
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))


def _window_points(records: list[dict[str, Any]], window: int) -> list[dict[str, Any]]:
    points = []
    for end in range(window, len(records) + 1, max(1, window // 5)):
        part = records[end - window:end]
        used = max(1, sum(r["output_tokens"] for r in part))
        points.append({"completions": end,
                       "coverage": sum(r["output_tokens"] <= r["bound"] for r in part) / len(part),
                       "reserved_per_used": sum(r["bound"] for r in part) / used,
                       "fallback_share": sum(bool(r.get("bound_fallback")) for r in part) / len(part)})
    return points


def within_target(coverage: float, quantile: float) -> bool:
    """Whether a window's coverage is within 0.03 of q (0.93 of 100 counts: no float slack decides it)."""
    return abs(coverage - quantile) <= 0.03 + 1e-9


def rolling(records: list[dict[str, Any]], window: int, quantile: float) -> dict[str, Any]:
    """Coverage of the served initial bound and reserved/used over the stream, in windows of completions.

    Every completion counts: an answer cut at ``max_tokens`` is covered exactly when its bound reached
    ``max_tokens`` (bounds are capped there), so coverage is observed even though its length is not. The
    windows of answers that ended by themselves (``stop``) are reported beside. ``within_0.03_from``: the
    first window end from which every window's coverage is within 0.03 of q (0.93 of 100 counts: no float
    slack decides it)."""
    done = [r for r in records if r.get("finish_reason") in ("stop", "length") and r.get("bound")]
    points = _window_points(done, window)
    within = next((p["completions"] for i, p in enumerate(points)
                   if all(within_target(q["coverage"], quantile) for q in points[i:])), None)
    stopped = [r for r in done if r["finish_reason"] == "stop"]
    return {"window": window, "points": points, "stop_points": _window_points(stopped, window),
            "stop_completions": len(stopped), "capped_completions": len(done) - len(stopped),
            "within_0.03_from": within}


def bound_variants(redis_url: str, estimator_url: str) -> dict[str, list[str]]:
    """``tempo serve`` options of Tempo with each source of length bounds the loop compares."""
    return {"learned": ["--policy", "tempo", "--redis-url", redis_url, "--estimator-url", estimator_url,
                        "--estimator-timeout", "0.5"],
            "empirical ladders": ["--policy", "tempo", "--bounds", "empirical"],
            "fixed bound": ["--policy", "tempo", "--bounds", "fixed"]}


def run_learning_loop(n: int = 600, concurrency: int = 16, max_tokens: int = 512, retrain_at: int = 300,
                      window: int = 100, model: str = "smollm2", logs: Path = Path("out/loop-logs"),
                      stage: Callable[[str], None] = lambda s: None, compare: bool = True,
                      compare_duration_s: float = 40.0, compare_load: float = 2.0) -> dict[str, Any]:
    served = SERVED_NAMES.get(model, Path(model).name)
    prompts = loop_prompts(n)
    started = time.perf_counter()
    with Stack() as stack:
        redis = stack.add(LocalRedis())
        artifact = bootstrap_artifact(lambda s: stage(f"length model: {s}"))
        stage("estimator service")
        estimator = stack.add(EstimatorService(redis.url, artifact, logs / "estimator.log"))
        stage("tempo serve")
        server = stack.add(ManagedServer(["--model", model, "--policy", "tempo", "--redis-url", redis.url,
                                          "--estimator-url", estimator.url, "--estimator-timeout", "0.5"],
                                         logs / "serve.log").start())
        retrain: dict[str, Any] = {}

        def on_done(count: int) -> None:
            stage(f"{count}/{len(prompts)} completions")
            if count == retrain_at and not retrain:
                retrain["started_at"] = count
                retrain["process"] = subprocess.Popen(
                    [sys.executable, "-m", "tempo.cli", "estimator", "retrain", "--min-samples", "100",
                     "--redis-url", redis.url, "--artifacts", str(estimator.artifacts),
                     "--json", str(logs / "retrain.json")], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

        asyncio.run(_drive(server.url, served, prompts, concurrency, max_tokens, on_done))
        time.sleep(3.0)  # the last records reach Redis off the step loop
        if "process" in retrain:
            retrain["returncode"] = retrain.pop("process").wait(600)
            report_path = logs / "retrain.json"
            if report_path.is_file():
                retrain["report"] = json.loads(report_path.read_text())
        import redis as redis_lib

        client = redis_lib.Redis.from_url(redis.url)
        records = [json.loads(fields[b"data"]) for _, fields in client.xrange("tempo:completions")]
        records = [r for r in records if str(r.get("request_id", "")).find("loop-") >= 0]
        models = httpx.get(f"{estimator.url}/v1/models", timeout=10).json()
        server.stop()
        comparison = replay_variants(stack, bound_variants(redis.url, estimator.url), model, logs, stage,
                                     compare_duration_s, compare_load).report if compare else None
    return {"completions": len(records), "concurrency": concurrency, "max_tokens": max_tokens,
            "quantile": 0.9, "rolling": rolling(records, window, 0.9), "retrain": retrain, "models": models,
            "wall_s": round(time.perf_counter() - started, 1), "bounds_in_scheduling": comparison,
            "records": [{k: r[k] for k in ("request_id", "slo_class", "app", "prompt_tokens", "estimate_prompt_tokens",
                                           "output_tokens", "bound", "bound_fallback", "finish_reason") if k in r}
                        for r in records],
            "lengths": {"median_output": sorted(r["output_tokens"] for r in records)[len(records) // 2]
                        if records else None}}
