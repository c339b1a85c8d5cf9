"""``tempo bench``: the goodput benchmark of scheduling policies on the engine simulator (issue #4)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from tempo.serving.bench.benchmark import (
    BASELINES,
    DEFAULT_LOAD_FACTORS,
    DEFAULT_POLICIES,
    DEFAULT_SATURATION_RPS,
    QUICK_DURATION_S,
    QUICK_LOAD_FACTORS,
    BenchConfig,
    parse_floats,
    parse_policies,
    run_bench,
)
from tempo.serving.profiles.profile import DEFAULT_PROFILE, profile_names
from tempo.serving.workloads.builder import DEFAULT_MODEL
from tempo.serving.workloads.cli import make_console, parse_tiers

from tempo.errors import TempoError


def bench_command(
    workload: Annotated[
        Path | None, typer.Option(help="Replay this workload file (one rate) instead of building workloads.")
    ] = None,
    policies: Annotated[
        str,
        typer.Option(
            help="Comma-separated policy specs: NAME, NAME:ESTIMATOR, NAME@key=value+key=value (docs/scheduler.md)."
        ),
    ] = ",".join(DEFAULT_POLICIES),
    estimator: Annotated[
        str, typer.Option(help="Bound provider for policies that name none: empirical, fixed, oracle, ...")
    ] = "empirical",
    engine: Annotated[str, typer.Option(help="Engine: 'sim' (the simulator) or 'vllm' (the real engine behind "
                                        "'tempo serve', one server per policy).")] = "sim",
    profile: Annotated[
        str, typer.Option(help=f"Engine profile name or JSON path ({', '.join(profile_names())}).")
    ] = DEFAULT_PROFILE,
    rps: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated arrival rates. Default: 0.5x, 1.5x and 2x the FCFS saturation rate (default "
            "profile: the measured one; other profiles: measured first)."
        ),
    ] = None,
    duration: Annotated[float, typer.Option(help="Seconds of arrivals per workload.")] = 600.0,
    mix: Annotated[str, typer.Option(help="Class weights L:D:C[:B] for built workloads.")] = "1:1:1:0",
    arrivals: Annotated[
        str, typer.Option(help="'azure-conv' (default), 'poisson' or an Azure-format trace CSV.")
    ] = "azure-conv",
    seed: Annotated[int, typer.Option(help="Seed of the workloads (the same for every policy).")] = 0,
    tiers: Annotated[str, typer.Option(help="SLO scale tiers.")] = "1,2,3,4",
    model: Annotated[str, typer.Option(help="Served model whose CASTILLO lengths the workload uses.")] = DEFAULT_MODEL,
    quantile: Annotated[float, typer.Option(help="Quantile of the length bounds.")] = 0.9,
    decode_weight: Annotated[float, typer.Option(help="Weight of decode tokens in goodput (paper's code: 8).")] = 1.0,
    step_noise: Annotated[float, typer.Option(help="Relative std of step-time noise (0: deterministic).")] = 0.0,
    charge_decisions: Annotated[bool, typer.Option(help="Charge each decision's measured time to the simulated "
                                                   "clock, as the real engine pays it (runs then vary with the "
                                                   "machine).")] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results as JSON here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write a goodput-vs-rate plot (PNG) here.")] = None,
    prompt_split: Annotated[
        str | None, typer.Option(help="Draw prompts from this CASTILLO hash split (test: unseen by length models).")
    ] = None,
    training_size: Annotated[
        int, typer.Option(help="Arrivals in the training set the empirical bounds are fitted on.")
    ] = 6000,
    quick: Annotated[
        bool,
        typer.Option(help=f"A short run: {QUICK_DURATION_S:g} s workloads at the two overloaded default rates."),
    ] = False,
    find_capacity: Annotated[
        bool, typer.Option("--find-capacity", help="Only measure the FCFS saturation rate of the profile.")
    ] = False,
    cost: Annotated[
        bool, typer.Option("--cost", help="Only benchmark the decision time with many queued requests.")
    ] = False,
    queued: Annotated[str, typer.Option(help="With --cost: queue sizes.")] = "100,1000,10000",
    running: Annotated[str, typer.Option(help="With --engine vllm --cost: running requests (step time with the "
                                         "plug-in against plain vLLM).")] = "16,256",
    serve_model: Annotated[str, typer.Option(help="--engine vllm: the model 'tempo serve' serves (tiny, smollm2 "
                                             "or a directory).")] = "tiny",
    serve_args: Annotated[str, typer.Option(help="--engine vllm: more 'tempo serve' options, as one string "
                                            "(vLLM's after '--').")] = "",
    url: Annotated[str | None, typer.Option(help="--engine vllm: a running 'tempo serve' (one policy).")] = None,
    repeats: Annotated[int, typer.Option(help="--engine vllm: runs per policy, interleaved.", min=1)] = 1,
    learning_loop: Annotated[bool, typer.Option(help="--engine vllm: the estimator learning the served model's "
                                                "own lengths online (SmolLM2, natural lengths).")] = False,
    completions: Annotated[int, typer.Option(help="--learning-loop: completions to send.", min=50)] = 600,
    compare: Annotated[bool, typer.Option(help="--learning-loop: then Tempo on the demo's mix with each source of "
                                          "bounds (three more servers, minutes).")] = True,
    calibrate: Annotated[bool, typer.Option(help="--engine vllm: only measure the engine (unloaded TTFT by prompt "
                                            "length, inter-token time, FCFS saturation) and write the calibrated "
                                            "SLOs (--json).")] = False,
    slo_calibration: Annotated[Path | None, typer.Option(help="--engine vllm: a --calibrate JSON; its SLOs are the "
                                                         "workload's base SLOs.")] = None,
    load: Annotated[str | None, typer.Option(help="--engine vllm: rates as multiples of the calibrated FCFS "
                                             "saturation, e.g. 1,1.5,2 (needs --slo-calibration).")] = None,
    natural_lengths: Annotated[bool, typer.Option(help="--engine vllm: the model stops by itself (max_tokens is "
                                                  "a cap) instead of the workload's forced lengths.")] = False,
) -> None:
    """Goodput benchmark of scheduling policies on the engine simulator: tables, JSON and a plot."""
    if engine not in ("sim", "vllm"):
        raise TempoError(f"--engine must be 'sim' or 'vllm', got {engine!r}")
    if quantile <= 0 or quantile >= 1:
        raise TempoError("--quantile must be in (0, 1)")
    console = make_console(min_width=160)
    if cost and engine == "vllm":
        from tempo.serving.bench.vllm_cli import engine_cost

        engine_cost(running, json_out, console)
        return
    if cost:
        _cost(policies, queued, profile, seed, json_out, console)
        return
    specs = parse_policies(policies, estimator)
    if engine == "vllm":
        from tempo.serving.bench.vllm_cli import EngineBenchArgs, engine_bench, engine_learning_loop

        if learning_loop:
            engine_learning_loop("smollm2" if serve_model == "tiny" else serve_model, completions, json_out, console,
                                 compare)
            return

        engine_bench(EngineBenchArgs(specs, workload, rps, QUICK_DURATION_S if quick else duration, mix, arrivals,
                                     seed, parse_tiers(tiers), model, serve_model, serve_args, url, repeats,
                                     natural_lengths, decode_weight, calibrate, slo_calibration, load),
                     json_out, console)
        return
    config = BenchConfig(
        policies=specs,
        profile=profile,
        workload=workload,
        duration_s=QUICK_DURATION_S if quick else duration,
        mix=mix,
        arrivals=arrivals,
        seed=seed,
        tiers=parse_tiers(tiers),
        model=model,
        quantile=quantile,
        decode_weight=decode_weight,
        step_noise=step_noise,
        charge_decisions=charge_decisions,
        training_size=min(training_size, 2000) if quick else training_size,
        prompt_split=prompt_split,
    )
    if find_capacity:
        from tempo.serving.bench.benchmark import find_capacity as measure

        found = measure(config)
        console.print(
            f"FCFS sustains {found['sustained_tokens_per_s']:,.0f} tokens/s on {profile}; the workload has "
            f"{found['tokens_per_arrival']:,.0f} tokens per arrival: saturation at "
            f"[bold]{found['saturation_rps']:.2f}[/] arrivals/s"
        )
        if json_out:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps(found, indent=2) + "\n", encoding="utf-8")
        return

    saturation: float | None = None
    if rps is not None:
        config.rps = parse_floats(rps, "--rps")
    elif workload is None:
        default_setting = profile == DEFAULT_PROFILE and mix == "1:1:1:0" and arrivals == "azure-conv" and (
            model == DEFAULT_MODEL and tiers == "1,2,3,4"
        )
        if default_setting:
            saturation = DEFAULT_SATURATION_RPS
        else:
            from tempo.serving.bench.benchmark import find_capacity as measure

            console.print("measuring the FCFS saturation rate of this setting first ...")
            saturation = measure(config)["saturation_rps"]
        factors = QUICK_LOAD_FACTORS if quick else DEFAULT_LOAD_FACTORS
        config.rps = [round(f * saturation, 3) for f in factors]
        console.print(
            f"rates {config.rps} arrivals/s = {', '.join(f'{f:g}x' for f in factors)} the FCFS "
            f"saturation rate {saturation:g}"
        )

    total = len(specs) * max(1, len(config.rps) if workload is None else 1)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:.0f}/{task.total:.0f} runs"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    ) as progress:
        task = progress.add_task("benchmark", total=total)
        done = [0]

        def on_progress(label: str, fraction: float) -> None:
            progress.update(task, description=label, completed=done[0] + min(fraction, 0.999))

        def on_run(run: object) -> None:
            done[0] += 1
            progress.update(task, completed=done[0])

        result = run_bench(config, saturation_rps=saturation, on_run=on_run, progress=on_progress)

    from tempo.serving.bench.report import plot_bench, print_bench

    print_bench(result, console)
    missing = [b for b in BASELINES if b not in {s.name for s in specs}]
    if missing and "tempo" in {s.label for s in specs}:
        console.print(f"(best baseline among those run; not run: {', '.join(missing)})")
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(result.model_dump_json(indent=1) + "\n", encoding="utf-8")
        console.print(f"wrote {json_out}")
    if plot:
        plot_bench(result, plot)
        console.print(f"wrote {plot}")


def _cost(policies: str, queued: str, profile: str, seed: int, json_out: Path | None, console: Console) -> None:
    from tempo.serving.bench.cost import COST_POLICIES, reference_loop_ms, scheduler_cost

    names = [s.name for s in parse_policies(policies)] if policies != ",".join(DEFAULT_POLICIES) else list(
        COST_POLICIES
    )
    sizes = [int(v) for v in parse_floats(queued, "--queued")]
    rows = scheduler_cost(names, sizes, profile, seed)
    table = Table(title=f"decision time (ms), {rows[0].running if rows else 0} running + queued", title_justify="left")
    for column in ("policy", *(f"{n:,} queued p50 / p99 (cold)" for n in sizes)):
        table.add_column(column, justify="left" if column == "policy" else "right")
    for name in dict.fromkeys(r.policy for r in rows):
        cells = []
        for n in sizes:
            row = next(r for r in rows if r.policy == name and r.queued == n)
            cells.append(f"{row.p50_ms:.2f} / {row.p99_ms:.2f} ({row.cold_ms:.1f})")
        table.add_row(name, *cells)
    console.print(table)
    reference = reference_loop_ms()
    console.print(f"(machine yardstick: a 1M-iteration Python loop takes {reference:.0f} ms here)")
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"reference_loop_ms": reference, "rows": [r.__dict__ for r in rows]}
        json_out.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
        console.print(f"wrote {json_out}")
