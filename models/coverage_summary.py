"""One table from many ``tempo estimator eval`` reports: coverage per (quantile, subsample) and method.

``python -m tempo.models.coverage_summary REPORT.json ... --json OUT`` reads the reports (their config
says the quantile, subsample, seed; their ``pooled`` result every calibration method they compared, and
their ``leave_one_model_out`` part if any) and prints, per (q, F, method), each run's pooled coverage,
lowest per-dataset coverage and reserved tokens per used token, with the medians over runs, against the
issue #14 targets: pooled in [q, q + 0.02], every dataset >= q - 0.04; leave-one-model-out after N
recalibration completions: pooled within 0.02 of q, every dataset >= q - 0.06.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table


def _runs(reports: list[dict[str, Any]]) -> dict[tuple[float, float, str], list[dict[str, Any]]]:
    out: dict[tuple[float, float, str], list[dict[str, Any]]] = {}
    for report in reports:
        config, pooled = report["config"], report["results"].get("pooled")
        if pooled is None:
            continue
        for name, result in pooled.items():
            if not name.startswith("tempo[") and not name.startswith("baseline_a"):
                continue
            method = name.split("|")[1].rstrip("]") if "|" in name else (
                config.get("calibration", ["shrink"])[0] if name.startswith("tempo[") else name)
            out.setdefault((config["quantile"], config.get("subsample", 1.0), method), []).append({
                "seed": config["seed"], "coverage": result["coverage"],
                "min_dataset_coverage": result["min_dataset_coverage"],
                "reserved_per_used": result["reserved_per_used"],
                "coverage_by_dataset": {d: v["coverage"] for d, v in result["coverage_by_dataset"].items()}})
    return out


def _lomo(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for report in reports:
        lomo = report.get("leave_one_model_out")
        if not lomo:
            continue
        q = report["config"]["quantile"]
        for method, result in lomo.get("by_calibration", {"-": lomo}).items():
            for n, after in result["after"].items():
                rows.append({"held_out": lomo["held_out"], "quantile": q, "method": method, "n": int(n),
                             "before": result["before_recalibration"]["coverage"],
                             "coverage": after["coverage"], "coverage_p10": after["coverage_p10"],
                             "coverage_p90": after["coverage_p90"],
                             "min_dataset_mean_coverage": after["min_dataset_mean_coverage"],
                             "reserved_per_used": after["reserved_per_used"],
                             "meets_target": abs(after["coverage"] - q) <= 0.02
                             and after["min_dataset_mean_coverage"] >= q - 0.06})
    return rows


def summarize(paths: list[Path]) -> dict[str, Any]:
    reports = [json.loads(p.read_text()) for p in paths]
    rows = []
    for (q, fraction, method), runs in sorted(_runs(reports).items()):
        median = {k: round(statistics.median(r[k] for r in runs), 4)
                  for k in ("coverage", "min_dataset_coverage", "reserved_per_used")}
        meets = all(q <= r["coverage"] <= q + 0.02 and r["min_dataset_coverage"] >= q - 0.04 for r in runs)
        datasets = sorted(runs[0]["coverage_by_dataset"])
        by_dataset = {d: round(statistics.mean(r["coverage_by_dataset"][d] for r in runs), 4) for d in datasets}
        mean = round(statistics.mean(r["coverage"] for r in runs), 4)
        rows.append({"quantile": q, "subsample": fraction, "method": method, "runs": runs, "median": median,
                     "mean_coverage": mean, "mean_coverage_by_dataset": by_dataset,
                     "every_run_meets_target": meets,
                     "mean_over_runs_meets_target": q <= mean <= q + 0.02 and min(by_dataset.values()) >= q - 0.04})
    return {"reports": [str(p) for p in paths], "coverage": rows, "leave_one_model_out": _lomo(reports)}


def print_summary(summary: dict[str, Any], console: Console) -> None:
    table = Table(title=escape("coverage (5-fold, pooled); target: pooled in [q, q+0.02], every dataset >= q-0.04"),
                  title_justify="left")
    for column in ("q", "F", "method", "runs", "coverage per run", "min dataset per run",
                   "min dataset (mean of runs)", "reserved/used (median)", "meets: every run / mean"):
        table.add_column(column)
    for row in summary["coverage"]:
        table.add_row(str(row["quantile"]), str(row["subsample"]), row["method"], str(len(row["runs"])),
                      " ".join(f"{r['coverage']:.3f}" for r in row["runs"]),
                      " ".join(f"{r['min_dataset_coverage']:.3f}" for r in row["runs"]),
                      f"{min(row['mean_coverage_by_dataset'].values()):.3f}",
                      f"{row['median']['reserved_per_used']:.3f}",
                      f"{'yes' if row['every_run_meets_target'] else 'no'} / "
                      f"{'yes' if row['mean_over_runs_meets_target'] else 'no'}")
    console.print(table)
    if summary["leave_one_model_out"]:
        lomo = Table(title="leave-one-model-out (mean of draws); target at N = 200: within 0.02 of q, "
                     "every dataset >= q-0.06", title_justify="left")
        for column in ("held out", "q", "method", "N", "before", "after (p10-p90)", "min dataset", "reserved/used",
                       "meets"):
            lomo.add_column(column)
        for r in summary["leave_one_model_out"]:
            lomo.add_row(r["held_out"], str(r["quantile"]), r["method"], str(r["n"]), f"{r['before']:.3f}",
                         f"{r['coverage']:.3f} ({r['coverage_p10']:.3f}-{r['coverage_p90']:.3f})",
                         f"{r['min_dataset_mean_coverage']:.3f}", f"{r['reserved_per_used']:.3f}",
                         "yes" if r["meets_target"] else "no")
        console.print(lomo)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tempo.models.coverage_summary", description=__doc__.split("\n")[0])
    parser.add_argument("reports", nargs="+", type=Path, help="tempo estimator eval JSON reports")
    parser.add_argument("--json", type=Path, help="write the summary here")
    args = parser.parse_args(argv)
    summary = summarize(args.reports)
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2))
    print_summary(summary, Console(width=160))


if __name__ == "__main__":
    main()
