"""What Tempo costs inside the engine: step times of the real vLLM-CPU engine with the plug-in (policy
``tempo`` or ``fcfs``) against plain vLLM, at a given number of running requests.

Each variant runs in its own process (one engine per process): the engine core in-process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``), B requests of mixed classes (latency, deadline, compound) with
ladders as the front end would attach them, submitted at once, each decoding ``decode_steps`` tokens;
every ``LLMEngine.step()`` is timed, and the steps where all B requests decode (one token each) are the
sample: the step loop's own time plus the plug-in's per-step work (the step rule, the reordering) and,
every frame and after events, the policy's decision. Medians and p99 over ``repeats`` passes.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

VARIANTS = ("vllm", "fcfs", "tempo")  # plain vLLM (its own scheduler), the plug-in with FCFS, with Tempo


def _xargs(i: int) -> dict[str, Any]:
    from tempo.scheduler.bounds import BoundLadder
    from tempo.serving.vllm.slo_fields import ladder_to_xargs

    ladder = ladder_to_xargs(BoundLadder(((0, 300), (100, 360), (200, 420))))
    kind = i % 3
    if kind == 0:
        return {"slo_class": "latency", "ttft_slo_s": 2.0, "tbt_slo_s": 0.2, **ladder}
    if kind == 1:
        return {"slo_class": "deadline", "deadline_s": 60.0, **ladder}
    return {"slo_class": "compound", "job_id": f"j{i // 6}", "stage": 0, "job_deadline_s": 120.0, **ladder}


def measure_variant(variant: str, batches: list[int], decode_steps: int, repeats: int,
                    prompt_tokens: int) -> dict[str, Any]:
    """In this process: the step times of one variant (see the module docstring)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from tempo.serving.checkpoints.tiny_llama import ensure_tiny_llama
    from tempo.serving.vllm.config import ServeConfig
    from vllm import LLM, SamplingParams, TokensPrompt

    kwargs: dict[str, Any] = {}
    if variant != "vllm":
        os.environ.update(ServeConfig(policy=variant, spill_path=None).to_env())
        from tempo.serving.vllm.scheduler import TempoScheduler

        kwargs["scheduler_cls"] = TempoScheduler
    llm = LLM(model=str(ensure_tiny_llama()), dtype="float32", max_model_len=2048, enforce_eager=True,
              max_num_seqs=max(batches), enable_prefix_caching=False, seed=0, **kwargs)
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    samples: dict[int, list[float]] = {b: [] for b in batches}
    counter = 0
    for pass_ in range(repeats + 1):  # the first pass warms up
        for b in batches:
            for i in range(b):
                counter += 1
                params = SamplingParams(max_tokens=decode_steps, ignore_eos=True, temperature=0.0,
                                        extra_args=_xargs(i))
                ids = [(counter * 31 + j * 7) % 3800 + 100 for j in range(prompt_tokens)]
                engine.add_request(f"o{counter}", TokensPrompt(prompt_token_ids=ids), params)
            times: list[float] = []
            while engine.has_unfinished_requests():
                started = time.perf_counter()
                engine.step()
                elapsed = time.perf_counter() - started
                running = scheduler.running
                if len(running) == b and all(r.num_output_tokens > 1 for r in running):
                    times.append(elapsed)
            if pass_ > 0:
                samples[b].extend(times[1:])  # the first full-batch step still carries the last prefill
    out: dict[str, Any] = {"variant": variant, "rows": []}
    for b in batches:
        ts = sorted(samples[b])
        out["rows"].append({"running": b, "steps": len(ts), "median_ms": 1000 * statistics.median(ts),
                            "p99_ms": 1000 * ts[min(len(ts) - 1, int(0.99 * len(ts)))],
                            "mean_ms": 1000 * statistics.fmean(ts)})
    if variant != "vllm":
        out["tempo"] = scheduler.tempo_report()
    return out


def measure_overhead(batches: list[int], decode_steps: int = 200, repeats: int = 3, prompt_tokens: int = 64,
                     variants: tuple[str, ...] = VARIANTS) -> dict[str, Any]:
    """Every variant in a child process, in turn; the rows and the ratios to plain vLLM."""
    results = []
    for variant in variants:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out.json"
            command = [sys.executable, "-m", "tempo.serving.vllm.overhead", variant, ",".join(map(str, batches)),
                       str(decode_steps), str(repeats), str(prompt_tokens), str(out)]
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            results.append(json.loads(out.read_text()))
    base = {r["running"]: r for r in results[0]["rows"]} if results and results[0]["variant"] == "vllm" else {}
    for result in results:
        for row in result["rows"]:
            ref = base.get(row["running"])
            if ref:
                row["median_vs_vllm"] = row["median_ms"] / ref["median_ms"]
                row["p99_vs_vllm"] = row["p99_ms"] / ref["p99_ms"]
    return {"batches": batches, "decode_steps": decode_steps, "repeats": repeats, "prompt_tokens": prompt_tokens,
            "results": results}


if __name__ == "__main__":
    variant, batches, steps, repeats, prompt, path = sys.argv[1:7]
    result = measure_variant(variant, [int(b) for b in batches.split(",")], int(steps), int(repeats), int(prompt))
    Path(path).write_text(json.dumps(result))
