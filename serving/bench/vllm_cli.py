"""``tempo bench --engine vllm``: build or read the workload, run the policies on the real engine, print."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from tempo.serving.bench.benchmark import PolicySpec
from tempo.serving.bench.vllm_bench import EngineBenchConfig, run_engine_bench
from tempo.serving.workloads.builder import WorkloadSpec, build_workload
from tempo.serving.workloads.format import read_workload
from tempo.serving.workloads.sources import azure_conv_trace_path

from tempo.errors import TempoError


def engine_bench(specs: list[PolicySpec], workload_path: Path | None, rps: str | None, duration: float, mix: str,
                 arrivals: str, seed: int, tiers: tuple[int, ...], model: str, serve_model: str, serve_args: str,
                 url: str | None, repeats: int, natural: bool, decode_weight: float, json_out: Path | None,
                 console: Console) -> None:
    from tempo.serving.workloads.builder import ClassMix

    if any(s.estimator not in ("empirical", "oracle") for s in specs):
        raise TempoError("--engine vllm: bounds come from 'tempo serve' (--serve-args '--estimator-url ...'), "
                         "not from a policy's ':ESTIMATOR'")
    if workload_path is not None:
        workload = read_workload(workload_path)
    elif rps is not None and "," not in rps:
        trace = str(azure_conv_trace_path()) if arrivals == "azure-conv" else arrivals
        workload = build_workload(WorkloadSpec(rps=float(rps), duration_s=duration, mix=ClassMix.parse(mix),
                                               arrivals=trace, seed=seed, model=model, tiers=tiers))
    else:
        raise TempoError("--engine vllm needs --workload FILE or one --rps")
    if not workload:
        raise TempoError("the workload is empty")
    labels = [s.name + ("@" + "+".join(f"{k}={v}" for k, v in s.params) if s.params else "") for s in specs]
    config = EngineBenchConfig(labels, serve_model, repeats, natural, decode_weight, shlex.split(serve_args), url)
    runs = repeats * (1 if url else len(labels))
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console,
                  transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task("engine benchmark", total=runs)
        finished: dict[str, float] = {}

        def on_progress(label: str, fraction: float) -> None:
            finished[label] = fraction
            progress.update(task, description=label, completed=sum(finished.values()))

        result = run_engine_bench(workload, config, on_progress)
    result["config"] = {"policies": labels, "serve_model": serve_model, "serve_args": serve_args,
                        "repeats": repeats, "natural_lengths": natural, "requests": len(workload),
                        "workload": str(workload_path) if workload_path else {"rps": rps, "duration_s": duration,
                                                                               "mix": mix, "seed": seed}}
    print_engine_bench(result, console)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        console.print(f"wrote {json_out}")


def print_engine_bench(result: dict[str, Any], console: Console) -> None:
    table = Table(title="real engine (medians over repeats; ratios within a repeat)", title_justify="left")
    for column in ("policy", "token goodput", "vs fcfs", "req goodput", "raw tok/s", "vs fcfs",
                   "attainment L / D / C", "decision ms"):
        table.add_column(column, justify="left" if column == "policy" else "right")
    for policy, row in result["medians"].items():
        att = row["attainment"]
        cells = " / ".join(f"{att[c]:.2f}" if c in att else "-" for c in ("latency", "deadline", "compound"))

        def ratio(value: float | None) -> str:
            return "-" if value is None else f"{value:.2f}x"

        table.add_row(policy, f"{row['token_goodput']:,.0f}", ratio(row["token_goodput_vs_fcfs"]),
                      f"{row['request_goodput']:.2f}", f"{row['raw_throughput']:,.0f}",
                      ratio(row["raw_throughput_vs_fcfs"]), cells, f"{row['decision_mean_ms']:.2f}")
    console.print(table)
    for run in result["runs"]:
        e = run["engine"]
        console.print(f"  {run['policy']} #{run['repeat'] + 1}: {e['decisions']:.0f} decisions, preemptions "
                      f"{e['policy_preemptions']:.0f} by policy / {e['engine_preemptions']:.0f} by engine, "
                      f"{e['rejections']:.0f} rejected, {e['demotions']:.0f} demoted, {e['refused']:.0f} refused, "
                      f"{e['paced_skips']:.0f} skipped resident-steps; wall {run['wall_s']:.0f} s")


def engine_cost(running: str, json_out: Path | None, console: Console) -> None:
    """Step time of the real engine with Tempo's plug-in (fcfs, tempo) against plain vLLM."""
    from tempo.serving.vllm.overhead import measure_overhead

    try:
        batches = [int(v) for v in running.split(",")]
    except ValueError:
        raise TempoError(f"--running must be comma-separated integers, got {running!r}") from None
    with console.status("measuring step times (plain vLLM, the plug-in with fcfs, with tempo) ..."):
        result = measure_overhead(batches)
    table = Table(title="engine step time (ms) with every request decoding: median / p99 (x plain vLLM)",
                  title_justify="left")
    table.add_column("engine")
    for b in batches:
        table.add_column(f"{b} running", justify="right")
    for variant in result["results"]:
        cells = []
        for row in variant["rows"]:
            ratio = f" ({row['median_vs_vllm']:.2f}x / {row['p99_vs_vllm']:.2f}x)" if "median_vs_vllm" in row else ""
            cells.append(f"{row['median_ms']:.2f} / {row['p99_ms']:.2f}{ratio}")
        name = "plain vLLM" if variant["variant"] == "vllm" else f"plug-in, {variant['variant']}"
        table.add_row(name, *cells)
    console.print(table)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        console.print(f"wrote {json_out}")
