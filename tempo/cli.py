"""The ``tempo`` command line: one Typer app; each part of the system adds its sub-commands here.

Errors a user can cause (bad arguments, missing or malformed files) print one line and exit with 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from tempo.errors import TempoError
from tempo.estimator.cli import estimator_app
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
