"""The ``tempo`` command line: one Typer app; each part of the system adds its sub-commands here.

Errors a user can cause (bad arguments, missing or malformed files) print one line and exit with 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from tempo.errors import TempoError
from tempo.estimator.cli import estimator_app
from tempo.estimator.retention import DEDUPE_TTL_S, STREAM_MAXLEN
from tempo.serving.profiles.cli import profile_app
from tempo.serving.workloads.cli import make_console, workload_app

app = typer.Typer(
    name="tempo",
    help="Tempo: SLO-aware LLM serving. Workloads, length estimator, scheduler benchmark and serving.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(workload_app, name="workload")
app.add_typer(estimator_app, name="estimator")
app.add_typer(profile_app, name="profile")


from tempo.serving.bench.cli import bench_command  # noqa: E402  (the bench command lives with the benchmark)

app.command("bench")(bench_command)


from tempo.serving.vllm.server import serve_command  # noqa: E402  (the endpoint lives with the vLLM plug-in)

app.command("serve", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(serve_command)


from tempo.serving.fuzz.cli import fuzz_command  # noqa: E402  (the fuzz of both services lives in serving/fuzz)

app.command("fuzz")(fuzz_command)


@app.command("chaos")
def chaos(
    faults: Annotated[str, typer.Option(help="Comma-separated faults, in order (default: all): baseline, "
                                        "estimator-killed, estimator-slow, estimator-malformed, estimator-absurd, "
                                        "redis-restart, redis-maxmemory, worker-killed, retrain-worse, "
                                        "artifact-corrupt, serve-restart.")] = "all",
    hold: Annotated[float, typer.Option(help="Seconds each fault is held before it is healed.")] = 10.0,
    settle: Annotated[float, typer.Option(help="Seconds of normal service after each recovery.")] = 5.0,
    rps: Annotated[float, typer.Option(help="Arrivals per second of the steady mixed load.")] = 3.0,
    model: Annotated[str, typer.Option(help="Model tempo serve runs ('tiny' or a directory).")] = "tiny",
    seed: Annotated[int, typer.Option(help="Random seed of the workload.")] = 0,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the report (JSON) here.")] = None,
    out: Annotated[Path, typer.Option(help="Logs and scratch space.")] = Path("out/chaos"),
) -> None:
    """Inject each fault into a running stack (its own Redis, the estimator service, tempo serve) under
    steady mixed load; print requests sent / answered / failed (4xx, 5xx, aborted, refused), completions
    expected / recorded / lost / duplicated, and the recovery time per fault. Exit 1 when a completion
    was lost or duplicated, a client saw a 5xx outside the serve restart, or a fault never recovered."""
    from tempo.serving.chaos.faults import FAULTS
    from tempo.serving.chaos.run import ChaosConfig, print_table, run_chaos, verdict

    names = list(FAULTS) if faults == "all" else [f.strip() for f in faults.split(",") if f.strip()]
    console = make_console()
    report = run_chaos(ChaosConfig(names, hold, settle, rps, model, seed, out=out), console)
    print_table(console, report)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=1))
    problems = verdict(report)
    for problem in problems:
        console.print(f"[red]{problem}[/]")
    if problems:
        raise typer.Exit(1)


@app.command("soak")
def soak(
    duration: Annotated[float, typer.Option(help="Seconds of arrivals.", min=1)] = 3600.0,
    load: Annotated[float, typer.Option(help="Arrival rate as a multiple of the engine's calibrated saturation "
                                        "(4 = the overload run).", min=0.01)] = 1.0,
    rps: Annotated[float | None, typer.Option(help="Arrivals per second (overrides --load).")] = None,
    interval: Annotated[float, typer.Option(help="Seconds between memory samples and per-interval figures.")] = 30.0,
    model: Annotated[str, typer.Option(help="Model tempo serve runs ('tiny' or a directory).")] = "tiny",
    policy: Annotated[str, typer.Option(help="Scheduling policy of tempo serve.")] = "tempo",
    max_in_flight: Annotated[int, typer.Option(help="tempo serve's admission bound: beyond it, 503 at once with "
                                               "the reason.")] = 64,
    kv_cache_gib: Annotated[int, typer.Option(help="tempo serve's KV cache (GiB): it becomes resident as blocks "
                                              "are first used, so RSS climbs until all of it is.", min=1)] = 4,
    stream_maxlen: Annotated[int | None, typer.Option(help=f"Completion records Redis keeps (default {STREAM_MAXLEN:,}"
                                                      ": set lower to see the bound within a short run).")] = None,
    dedupe_ttl: Annotated[int | None, typer.Option(help="Seconds a request id's dedupe key lives in Redis "
                                                   f"(default {DEDUPE_TTL_S:,}).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed of the workload.")] = 0,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the report (JSON) here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write the plot (PNG) here.")] = None,
    out: Annotated[Path, typer.Option(help="Logs.")] = Path("out/soak"),
    engine_nice: Annotated[int, typer.Option(help="Niceness (0-19) of vLLM's engine processes: above 0, the load "
                                             "generator and the API server run ahead of the engine when they "
                                             "share its cores.")] = 0,
    freeze_gc: Annotated[bool, typer.Option(help="tempo serve's --freeze-gc/--no-freeze-gc (the report's "
                                            "gc_pauses: the API server's collections).")] = True,
    alternate_load: Annotated[float | None, typer.Option(help="Alternate blocks of --load and this load in one "
                                                         "run (the report's 'alternating': admitted work per "
                                                         "load, paired block by block, so that a host that "
                                                         "slows down or speeds up weighs on both alike).",
                                                         min=0.01)] = None,
    block: Annotated[float, typer.Option(help="--alternate-load: seconds per block.", min=1)] = 60.0,
    settle: Annotated[float, typer.Option(help="--alternate-load: seconds at the start of each block left out "
                                          "(the previous block's queue drains).", min=0)] = 10.0,
) -> None:
    """Steady mixed load on the whole stack for --duration seconds (or far past saturation with --load 4):
    resident memory of tempo serve and the estimator, Redis memory, p99 latency and attainment over time;
    refusals with their reason and how long clients waited for them."""
    from tempo.serving.chaos.soak import SoakConfig, run_soak
    from tempo.serving.chaos.soak import plot as plot_soak

    console = make_console()
    config = SoakConfig(duration, load, rps, interval, model, policy, max_in_flight, kv_cache_gib, stream_maxlen,
                        dedupe_ttl, seed, out, engine_nice, freeze_gc, alternate_load, block, settle)
    report = run_soak(config, console)
    summary = {k: report[k] for k in ("server", "config", "requests", "refusals", "load_generator", "rejections",
                                      "admitted", "memory", "steal_share", "gc_pauses", "loop_lag", "alternating")}
    console.print_json(json.dumps(summary))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=1))
    if plot is not None:
        plot_soak(report, plot)
    if report["server"]["exited_during_load"]:
        console.print(f"[red]tempo serve exited {report['server']['exit_s']} s into the load "
                      f"(code {report['server']['returncode']}); its log: {report['server']['log']}[/]")
        raise typer.Exit(1)


@app.command("demo")
def demo(
    duration: Annotated[float, typer.Option(help="Seconds of arrivals in each run.", min=5)] = 40.0,
    load: Annotated[float, typer.Option(help="Arrival rate as a multiple of the engine's estimated saturation.",
                                        min=0.1)] = 2.0,
    rps: Annotated[float | None, typer.Option(help="Arrivals per second (overrides --load).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed of the workload.")] = 0,
    out: Annotated[Path, typer.Option(help="Where the JSON, the plot and the logs go.")] = Path("out/demo"),
) -> None:
    """The main job end to end: Redis, the estimator service and tempo serve on SmolLM2; Tempo against FCFS on
    an overloaded mixed workload; the goodput table, an example answer and a plot. Stops what it started."""
    from tempo.demo import run_demo

    run_demo(make_console(), duration_s=duration, load=load, seed=seed, out=out, rps=rps)


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the app, turning user errors into one line on stderr and exit code 2."""
    command = typer.main.get_command(app)
    try:
        result = command.main(args=argv, prog_name="tempo", standalone_mode=False)
    except TempoError as exc:
        print(f"tempo: error: {exc}", file=sys.stderr)
        return 2
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        print("tempo: aborted", file=sys.stderr)
        return 130
    except typer.TyperException as exc:  # usage errors: bad option values, unknown commands
        print(f"tempo: error: {exc.format_message()}", file=sys.stderr)
        return exc.exit_code
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
