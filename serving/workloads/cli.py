"""``tempo workload ...``: build a workload file from real data, and summarise one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from tempo.serving.workloads.builder import DEFAULT_MODEL, ClassMix, WorkloadSpec, build_workload
from tempo.serving.workloads.format import read_workload, write_workload
from tempo.serving.workloads.stats import summarize

from tempo.errors import TempoError

workload_app = typer.Typer(help="Build mixed-class workloads from real data and summarise them.", no_args_is_help=True)


def make_console(min_width: int = 120) -> Console:
    """A rich console; output that is not a terminal gets a width that fits the tables."""
    console = Console()
    return console if console.is_terminal else Console(width=max(console.width, min_width))


def parse_tiers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}") from None


def calibrated_slos(path: Path) -> dict[str, float]:
    """The base SLOs (``ttft_s``, ``tbt_s``, ``deadline_s``, ``stage_deadline_s``) of a calibration file."""
    try:
        slo = json.loads(path.read_text())["slo"]
        return {k: float(slo[k]) for k in ("ttft_s", "tbt_s", "deadline_s", "stage_deadline_s")}
    except (OSError, ValueError, KeyError, TypeError):
        raise TempoError(f"{path}: not an SLO calibration file (write one with 'tempo bench --engine vllm "
                         "--calibrate --json FILE')") from None


@workload_app.command("build")
def build(
    output: Annotated[Path, typer.Option("-o", "--output", help="JSONL file to write.")],
    rps: Annotated[float, typer.Option(help="Target arrivals per second (a compound job is one arrival).")] = 2.0,
    duration: Annotated[float, typer.Option(help="Seconds of arrivals.")] = 600.0,
    mix: Annotated[
        str, typer.Option(help="Class weights L:D:C[:B] (latency, deadline, compound, best effort) or latency=1,...")
    ] = "1:1:1:0",
    arrivals: Annotated[
        str, typer.Option(help="'poisson', or the path of an arrival trace in the Azure CSV format.")
    ] = "poisson",
    seed: Annotated[int, typer.Option(help="Random seed; the same arguments and seed give the same file.")] = 0,
    model: Annotated[str, typer.Option(help="Served model whose CASTILLO lengths to use.")] = DEFAULT_MODEL,
    tiers: Annotated[str, typer.Option(help="SLO scale tiers drawn uniformly per request.")] = "1,2,3,4",
    prompt_split: Annotated[
        str | None,
        typer.Option(help="Draw prompts only from this split of CASTILLO (fit, calibration, test); 'test' keeps "
                     "the workload's prompts out of the length models' training data."),
    ] = None,
    slo_calibration: Annotated[
        Path | None,
        typer.Option(help="Base SLOs from a 'tempo bench --engine vllm --calibrate' JSON instead of the defaults "
                     "(TTFT 2 s, TBT 0.1 s, deadline 20 s, 20 s per compound stage)."),
    ] = None,
) -> None:
    """Build a workload and write it as JSONL (format: README, 'Workload format')."""
    base = calibrated_slos(slo_calibration) if slo_calibration is not None else {}
    spec = WorkloadSpec(
        rps=rps,
        duration_s=duration,
        mix=ClassMix.parse(mix),
        arrivals=arrivals,
        seed=seed,
        model=model,
        tiers=parse_tiers(tiers),
        prompt_split=prompt_split,
        **base,
    )
    requests = build_workload(spec)
    count = write_workload(output, requests)
    summary = summarize(requests)
    typer.echo(
        f"wrote {count} requests ({summary['arrivals']} arrivals, {summary['compound']['jobs']} compound jobs) "
        f"to {output}"
    )


@workload_app.command("stats")
def stats(
    path: Annotated[Path, typer.Argument(help="Workload JSONL file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Count, rate, class mix, prompt/output length percentiles and compound-job structure."""
    summary = summarize(read_workload(path))
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        print_summary(summary, make_console())


def print_summary(summary: dict[str, Any], console: Console) -> None:
    """The workload summary as rich tables."""
    rate = summary["rate_rps"]
    console.print(
        f"[bold]{summary['requests']}[/] requests, [bold]{summary['arrivals']}[/] arrivals over "
        f"{summary['span_s']:.1f} s = [bold]{rate if rate is not None else '-'}[/] arrivals/s"
    )
    table = Table(title="per class")
    for column in ("class", "arrivals", "share", "requests", "prompt p50/90/99", "output p50/90/99", "per tier"):
        table.add_column(column, justify="right" if column != "class" else "left")
    for name, row in summary["per_class"].items():
        p, o = row["prompt_tokens"], row["output_tokens"]
        table.add_row(
            name,
            str(row["arrivals"]),
            f"{summary['mix'].get(name, 0):.3f}",
            str(row["requests"]),
            f"{p['p50']:.0f}/{p['p90']:.0f}/{p['p99']:.0f}",
            f"{o['p50']:.0f}/{o['p90']:.0f}/{o['p99']:.0f}",
            "/".join(str(n) for n in row["tiers"].values()),
        )
    console.print(table)
    compound = summary["compound"]
    if compound["jobs"]:
        ok = "[green]intact[/]" if compound["stage_structure_ok"] else "[red]BROKEN[/]"
        console.print(
            f"compound: {compound['jobs']} jobs, {compound['calls']} calls, stages per job "
            f"{compound['stages_per_job']}, max fan-out {compound['max_fan_out']}, stage structure {ok}"
        )
