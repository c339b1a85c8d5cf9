"""``tempo fuzz estimator|serve``: the schema-based fuzz of one service, a summary, the report as JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from tempo.errors import TempoError

SERVICES = ("estimator", "serve")


def summary_lines(report: dict[str, Any]) -> list[str]:
    statuses = ", ".join(f"{status}: {n}" for status, n in report["by_status"].items())
    lines = [f"{report['service']}: {report['requests']} requests over {len(report['operations'])} operations in "
             f"{report['seconds']:.0f} s; by status {statuses}; {report['server_error_count']} server errors"]
    for error in report["server_errors"][:10]:
        lines.append(f"  {error['status']} {error['method']} {error['path']} ({error['mode']}): {error['body'][:160]}")
    for label, entry in report["operations"].items():
        if entry.get("errors"):
            lines.append(f"  {label}: generation failed: {entry['errors']}")
    if report.get("server_alive_after") is False:
        lines.append(f"  tempo serve was no longer running at the end; see {report.get('log')}")
    return lines


def fuzz_command(
    service: Annotated[str, typer.Argument(help="The service to fuzz: 'estimator' (the estimator service, "
                                           "in-process on a Redis of its own) or 'serve' (tempo serve on the tiny "
                                           "model, in a child process; needs make vllm).")],
    requests: Annotated[int, typer.Option(help="Generated requests to send in all (positive and negative cases, "
                                          "every operation).", min=1)] = 2000,
    seed: Annotated[int, typer.Option(help="Random seed of the generation.")] = 0,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the report (JSON) here.")] = None,
    log: Annotated[Path | None, typer.Option(help="serve: tempo serve's log (default: a temporary file).")] = None,
    startup_timeout: Annotated[float, typer.Option(help="serve: seconds to wait for tempo serve to answer.",
                                                   min=1)] = 1200.0,
) -> None:
    """Schema-based fuzz (schemathesis) of every endpoint of a service: count every response by status and
    list those >= 500 with method, path and body. Exit 1 when any response was >= 500 or a request got no
    answer."""
    from tempo.serving.workloads.cli import make_console

    if service not in SERVICES:
        raise TempoError(f"unknown service {service!r}: choose one of {', '.join(SERVICES)}")
    console = make_console()

    def progress(line: str) -> None:
        console.print(line, highlight=False)

    if service == "estimator":
        from tempo.serving.fuzz.estimator import fuzz_estimator

        report = fuzz_estimator(requests, seed, progress)
    else:
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise TempoError("'tempo fuzz serve' needs vLLM: run 'make vllm', then '.venv-vllm/bin/tempo fuzz serve'")
        from tempo.serving.fuzz.serve import fuzz_serve

        report = fuzz_serve(requests, seed, log=log, progress=progress, startup_s=startup_timeout)
    for line in summary_lines(report):
        console.print(line, highlight=False, markup=False)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=1, ensure_ascii=True) + "\n")
    if report["server_error_count"] or report.get("server_alive_after") is False:
        raise typer.Exit(1)
