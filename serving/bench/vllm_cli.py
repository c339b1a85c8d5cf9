"""``tempo bench --engine vllm``: build or read the workload, run the policies on the real engine, print."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
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


@dataclass
class EngineBenchArgs:
    """The ``tempo bench`` options that matter with ``--engine vllm``."""

    specs: list[PolicySpec]
    workload: Path | None
    rps: str | None
    duration_s: float
    mix: str
    arrivals: str
    seed: int
    tiers: tuple[int, ...]
    model: str  # whose CASTILLO lengths the workload uses
    serve_model: str
    serve_args: str
    url: str | None
    repeats: int
    natural: bool
    decode_weight: float
    calibrate: bool = False
    slo_calibration: Path | None = None
    load: str | None = None


def _spec(args: EngineBenchArgs, rps: float, slo: dict[str, float] | None) -> WorkloadSpec:
    from tempo.serving.workloads.builder import ClassMix

    trace = str(azure_conv_trace_path()) if args.arrivals == "azure-conv" else args.arrivals
    extra = {} if slo is None else {"ttft_s": slo["ttft_s"], "tbt_s": slo["tbt_s"], "deadline_s": slo["deadline_s"],
                                   "stage_deadline_s": slo["stage_deadline_s"]}
    return WorkloadSpec(rps=rps, duration_s=args.duration_s, mix=ClassMix.parse(args.mix), arrivals=trace,
                        seed=args.seed, model=args.model, tiers=args.tiers, **extra)


def engine_calibrate(args: EngineBenchArgs, json_out: Path | None, console: Console) -> dict[str, Any]:
    """Measure the engine under FCFS and write the calibrated SLOs and saturation rate."""
    from tempo.serving.bench.calibrate import calibrate
    from tempo.serving.bench.vllm_bench import SERVED_NAMES
    from tempo.serving.vllm.launch import ManagedServer

    served = SERVED_NAMES.get(args.serve_model, Path(args.serve_model).name)
    probe = build_workload(_spec(args, 2.0, None))
    with console.status("calibrating: unloaded TTFT and inter-token time, then FCFS overloaded ..."), \
            ManagedServer(["--model", args.serve_model, "--policy", "fcfs", *shlex.split(args.serve_args)],
                          Path("out/bench-vllm-logs/calibrate.log")) as server:
        quick = calibrate(server.url, served, probe)
        overload_rps = 4 * quick["saturation"]["rps"]
        overload = build_workload(_spec(args, overload_rps, quick["slo"]))
        result = calibrate(server.url, served, probe, overload=overload, measured=quick["measured"])
    result["config"] = {"serve_model": args.serve_model, "serve_args": args.serve_args, "mix": args.mix,
                        "arrivals": args.arrivals, "overload_rps": overload_rps, "duration_s": args.duration_s}
    slo, sat = result["slo"], result["saturation"]
    console.print(f"calibrated: TTFT {slo['ttft_s']:.3f} s, TBT {slo['tbt_s'] * 1000:.1f} ms, deadline "
                  f"{slo['deadline_s']:.2f} s, compound {slo['stage_deadline_s']:.2f} s per stage; FCFS saturation "
                  f"{sat['tokens_per_s']:,.0f} tokens/s = {sat['rps']:.3f} arrivals/s")
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        console.print(f"wrote {json_out}")
    return result


def engine_bench(args: EngineBenchArgs, json_out: Path | None, console: Console) -> None:
    if args.calibrate:  # FCFS only: --policies does not apply
        engine_calibrate(args, json_out, console)
        return
    if any(s.estimator not in ("empirical", "oracle") for s in args.specs):
        raise TempoError("--engine vllm: bounds come from 'tempo serve' (--serve-args '--estimator-url ...'), "
                         "not from a policy's ':ESTIMATOR'")
    calibration = None
    if args.slo_calibration is not None:
        try:
            calibration = json.loads(args.slo_calibration.read_text())
            calibration["slo"], calibration["saturation"]["rps"]
        except (OSError, ValueError, KeyError, TypeError):
            raise TempoError(f"--slo-calibration {args.slo_calibration}: not a calibration file (write one with "
                             "--calibrate --json FILE)") from None
    rates: list[tuple[str, list[Any]]] = []
    if args.workload is not None:
        rates.append((str(args.workload), read_workload(args.workload)))
    else:
        if args.load is not None:
            if calibration is None:
                raise TempoError("--load needs --slo-calibration FILE (the measured saturation rate)")
            values = [float(x) * calibration["saturation"]["rps"] for x in args.load.split(",")]
        elif args.rps is not None:
            values = [float(x) for x in args.rps.split(",")]
        else:
            raise TempoError("--engine vllm needs --workload FILE, --rps or --load")
        slo = calibration["slo"] if calibration else None
        rates += [(f"{r:.3f}/s", build_workload(_spec(args, r, slo))) for r in values]
    if any(not w for _, w in rates):
        raise TempoError("the workload is empty")
    labels = [s.name + ("@" + "+".join(f"{k}={v}" for k, v in s.params) if s.params else "") for s in args.specs]
    config = EngineBenchConfig(labels, args.serve_model, args.repeats, args.natural, args.decode_weight,
                               shlex.split(args.serve_args), args.url)
    results = []
    runs = len(rates) * args.repeats * (1 if args.url else len(labels))
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console,
                  transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task("engine benchmark", total=runs)
        finished: dict[str, float] = {}
        for rate, workload in rates:
            def on_progress(label: str, fraction: float, rate: str = rate) -> None:
                finished[f"{rate} {label}"] = fraction
                progress.update(task, description=f"{rate}: {label}", completed=sum(finished.values()))

            result = run_engine_bench(workload, config, on_progress)
            result.update(rate=rate, requests=len(workload))
            if calibration is not None:
                result["load"] = len({w.job_id or w.id for w in workload}) / max(1e-9, args.duration_s) / \
                    calibration["saturation"]["rps"]
            results.append(result)
    out = {"config": {"policies": labels, "serve_model": args.serve_model, "serve_args": args.serve_args,
                      "repeats": args.repeats, "natural_lengths": args.natural, "mix": args.mix, "seed": args.seed,
                      "duration_s": args.duration_s, "arrivals": args.arrivals},
           "calibration": calibration, "rates": results}
    for result in results:
        console.print(f"[bold]{result['rate']}[/] ({result['requests']} requests"
                      + (f", {result['load']:.2f}x saturation" if "load" in result else "") + ")")
        print_engine_bench(result, console)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
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


def engine_learning_loop(model: str, completions: int, json_out: Path | None, console: Console,
                         compare: bool = True) -> None:
    from tempo.serving.bench.learning_loop import run_learning_loop

    with console.status("learning loop ...") as status:
        result = run_learning_loop(n=completions, model=model, stage=lambda s: status.update(f"learning loop: {s}"),
                                   compare=compare)
    roll = result["rolling"]
    table = Table(title=f"rolling coverage of the served bound (q = 0.9, windows of {roll['window']} "
                        "completions)", title_justify="left")
    for column in ("completions", "coverage", "reserved / used", "fallback share"):
        table.add_column(column, justify="right")
    for point in roll["points"]:
        table.add_row(str(point["completions"]), f"{point['coverage']:.3f}", f"{point['reserved_per_used']:.2f}",
                      f"{point['fallback_share']:.2f}")
    console.print(table)
    console.print(f"{result['completions']} completions ({roll['stop_completions']} ended by themselves, "
                  f"{roll['capped_completions']} at max_tokens); within 0.03 of q from "
                  f"{roll['within_0.03_from']} completions on; retrain: "
                  f"{(result['retrain'].get('report') or {}).get('status', result['retrain'].get('returncode'))}")
    comparison = result.get("bounds_in_scheduling")
    if comparison:
        from tempo.demo import attainment_cell

        table = Table(title=f"Tempo with each source of bounds: {comparison['requests']} requests at "
                            f"{comparison['load']:.2f}x the estimated saturation, natural lengths",
                      title_justify="left")
        for column in ("bounds", "token goodput", "request goodput", "attainment L / D / C", "rejected"):
            table.add_column(column, justify="left" if column == "bounds" else "right")
        for label, run in comparison["runs"].items():
            table.add_row(label, f"{run['token_goodput']:,.0f} tok/s", f"{run['request_goodput']:.2f} /s",
                          attainment_cell(run["per_class"]), str(run["client"]["rejected"]))
        console.print(table)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=1, default=str) + "\n", encoding="utf-8")
        console.print(f"wrote {json_out}")
