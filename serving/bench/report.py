"""Rendering of benchmark results: the terminal table (rich), the goodput-vs-rate plot (matplotlib)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from rich.console import Console
from rich.table import Table
from tempo.serving.bench.benchmark import BASELINES, BenchOut, RateSummary, RunOut

CLASS_SHORT = {"latency": "L", "deadline": "D", "compound": "C", "best_effort": "B"}


def _fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def runs_table(runs: list[RunOut], title: str) -> Table:
    fcfs = next((r for r in runs if r.policy == "fcfs"), None)
    table = Table(title=title, title_justify="left")
    columns = (
        "policy", "token goodput", "x FCFS", "req/s good", "attain L/D/C", "TTFT p99", "TBT p99", "E2E p90",
        "throughput", "preempt", "reject", "demote", "decide p50/p99 ms",
    )
    for column in columns:
        table.add_column(column, justify="left" if column == "policy" else "right")
    for r in runs:
        attain = "/".join(
            "-" if (c := r.per_class.get(name)) is None or c.attainment is None else f"{c.attainment:.2f}"
            for name in ("latency", "deadline", "compound")
        )

        def worst(attr: str, q: str, run: RunOut = r) -> str:
            values = [getattr(getattr(c, attr), q) for c in run.per_class.values() if getattr(getattr(c, attr), q)]
            return _fmt(max(values), 2) if values else "-"

        table.add_row(
            r.policy,
            _fmt(r.token_goodput),
            _ratio(r.token_goodput / fcfs.token_goodput if fcfs and fcfs.token_goodput > 0 else None),
            _fmt(r.request_goodput, 2),
            attain,
            worst("ttft_s", "p99"),
            worst("tbt_s", "p99"),
            worst("e2e_s", "p90"),
            _fmt(r.raw_throughput),
            str(r.preemptions),
            str(r.rejections),
            str(r.demotions),
            f"{r.decision_time.p50_ms:.2f}/{r.decision_time.p99_ms:.2f}",
        )
    return table


def summary_table(summary: list[RateSummary]) -> Table:
    table = Table(title="Tempo against the others (token goodput ratios)", title_justify="left")
    for column in ("rps", "load", "tempo", "vs FCFS", "best baseline", "vs best", "vs oracle", "thr vs FCFS",
                   "ablations (vs tempo)"):
        table.add_column(column, justify="right" if column not in ("best baseline", "ablations (vs tempo)") else "left")
    for s in summary:
        table.add_row(
            f"{s.rps:g}",
            "-" if s.load_factor is None else f"{s.load_factor:.2f}x",
            _fmt(s.tempo),
            _ratio(s.tempo_vs_fcfs),
            f"{s.best_baseline} {_fmt(s.best_baseline_goodput)}" if s.best_baseline else "-",
            _ratio(s.tempo_vs_best_baseline),
            _ratio(s.tempo_vs_oracle),
            _ratio(s.throughput_vs_fcfs),
            ", ".join(f"{k} {v:.2f}x" for k, v in s.ablations.items()) or "-",
        )
    return table


def print_bench(result: BenchOut, console: Console) -> None:
    by_rate: dict[float, list[RunOut]] = defaultdict(list)
    for run in result.runs:
        by_rate[run.rps].append(run)
    for rps, runs in by_rate.items():
        first = runs[0]
        console.print(
            runs_table(
                runs,
                f"{rps:g} arrivals/s: {first.arrivals} arrivals, {first.requests} requests, "
                f"{first.window_s:g} s window, profile {result.profile['name']} (figures per window second)",
            )
        )
    console.print(summary_table(result.summary))


def plot_bench(result: BenchOut, path: Path) -> None:
    """Token goodput against offered rate, one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for run in result.runs:
        series[run.policy].append((run.rps, run.token_goodput))
    fig, ax = plt.subplots(figsize=(8, 5))
    palette = plt.get_cmap("tab20").colors
    baselines = set(BASELINES)
    for index, (label, points) in enumerate(series.items()):
        points.sort()
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        if label == "tempo":
            ax.plot(xs, ys, "-", color="black", marker="o", linewidth=2.8, label=label, zorder=5)
        elif label == "oracle":
            ax.plot(xs, ys, "-", color="grey", marker="s", linewidth=1.8, label=label, zorder=4)
        elif label in baselines:
            ax.plot(xs, ys, "--", color=palette[index % 20], marker="o", linewidth=1.4, label=label)
        else:  # ablations and parameter variants
            ax.plot(xs, ys, ":", color=palette[index % 20], marker="^", linewidth=1.4, label=label)
    if result.saturation_rps:
        ax.axvline(result.saturation_rps, color="grey", linewidth=0.8, linestyle=":")
        ax.text(result.saturation_rps, ax.get_ylim()[1] * 0.98, " FCFS saturation", color="grey", va="top", fontsize=8)
    ax.set_xlabel("offered load (arrivals / s)")
    ax.set_ylabel("token goodput (good tokens / s)")
    ax.set_title(f"Goodput vs rate: {result.profile['name']}, mix {result.config['mix']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncols=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
