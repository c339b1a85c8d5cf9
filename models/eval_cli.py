"""``tempo estimator eval``: train, calibrate and evaluate length bounds on held-out prompts, with baselines.

Accepts any lengths file in the CASTILLO format (CSV or JSONL, other models, other prompts) and its
prompts file. Rows are re-split by a hash of the prompt id (fit / calibration / test), per served model
and pooled with the model id as a feature; ``--leave-one-model-out`` also reports coverage on an unseen
model before and after recalibrating on N of its completions.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table
from tempo.data.castillo import LengthRow, castillo_lengths_path, castillo_prompts_path, load_length_rows, load_prompts
from tempo.models.artifact import artifact_size_bytes, save_artifact
from tempo.models.dataset import samples_from_rows, split_rows
from tempo.models.evaluation import (
    Split,
    bound_metrics,
    empirical_quantile_bounds,
    ladder_metrics,
    latency_ms,
    paper_style_model,
    prompt_length_bounds,
)
from tempo.models.length_bounds import LengthBoundModel, LengthSamples
from tempo.models.quantile import MODEL_KINDS

from tempo.errors import TempoError


def _split(rows: list[LengthRow], prompts: dict[str, str]) -> Split:
    parts = split_rows(rows)
    if not all(parts.values()):
        raise TempoError("too few prompts to split into fit, calibration and test")
    return Split(*(samples_from_rows(parts[name], prompts) for name in ("fit", "calibration", "test")))


def _floor(test: LengthSamples, quantile: float) -> dict[str, Any]:
    """Oracle floor: each prompt's true median times one factor chosen on the test set for coverage q."""
    medians = np.array([np.median(test.lengths[test.request_index == i]) for i in range(len(test.requests))])
    ratio = test.lengths / medians[test.request_index]
    factor = float(np.quantile(ratio, quantile, method="higher"))
    bound = np.ceil(medians[test.request_index] * factor)
    return {"coverage": round(float(np.mean(test.lengths <= bound)), 4),
            "reserved_per_used": round(float(bound.sum() / test.lengths.sum()), 4)}


def evaluate_target(split: Split, quantile: float, kinds: list[str], seed: int, n_estimators: int,
                    baselines: set[str], progress: Progress | None = None) -> dict[str, Any]:
    """Every method's metrics on one target (a served model, or all of them pooled)."""
    test = split.test
    apps = test.sample_apps
    out: dict[str, Any] = {"data": {s: len(getattr(split, s)) for s in ("fit", "calibration", "test")}}
    for kind in kinds:
        params = {"n_estimators": n_estimators} if kind != "hist_gb" else {"max_iter": n_estimators}
        start = time.perf_counter()
        model = LengthBoundModel(quantile=quantile, kind=kind, seed=seed, model_params=params)
        model.fit(split.fit).calibrate(split.calibration)
        train_s = time.perf_counter() - start
        bound = model.predict_bound(test.requests)[test.request_index]
        result = bound_metrics(test.lengths, bound, apps, quantile)
        assert model.featurizer_ is not None
        median = np.exp(model.featurizer_.transform(test.requests)[:, -1])[test.request_index]
        from scipy.stats import kendalltau

        result["kendall_tau_median"] = round(float(kendalltau(median, test.lengths).statistic), 4)
        result["ladder"] = ladder_metrics(model, test)
        result["latency_ms"] = {
            "single": latency_ms(model.predict_ladders, test.requests, 1, 300),
            "batch256": latency_ms(model.predict_ladders, test.requests, 256, 20),
        }
        result["train_s"] = round(train_s, 1)
        with tempfile.TemporaryDirectory() as tmp:
            save_artifact(model, Path(tmp) / "artifact")
            result["artifact_bytes"] = artifact_size_bytes(Path(tmp) / "artifact")
        out[f"tempo[{kind}]"] = result
        if progress is not None:
            progress.console.print(f"  {escape(f'tempo[{kind}]')}: coverage {result['coverage']}, reserved/used "
                                   f"{result['reserved_per_used']}, train {train_s:.0f} s")
    both = split.fit_and_calibration()
    if "a" in baselines:
        out["baseline_a_dataset_quantile"] = bound_metrics(
            test.lengths, empirical_quantile_bounds(both, test, quantile), apps, quantile)
        if len({r.model for r in test.requests}) > 1:
            out["baseline_a_dataset_model_quantile"] = bound_metrics(
                test.lengths, empirical_quantile_bounds(both, test, quantile, by_model=True), apps, quantile)
    if "b" in baselines:
        out["baseline_b_prompt_length"] = bound_metrics(
            test.lengths, prompt_length_bounds(split.fit, split.calibration, test, quantile, seed), apps, quantile)
    if "c" in baselines:
        paper = paper_style_model(seed=seed).fit(_cap(both, 120_000, seed))
        out["baseline_c_paper_qrf_q0.95"] = bound_metrics(
            test.lengths, paper.predict_bound(test.requests)[test.request_index], apps, 0.95)
        out["baseline_c_paper_qrf_q0.95"]["latency_ms"] = {
            "single": latency_ms(paper.predict_bound, test.requests, 1, 100)}
    out["floor_oracle_median"] = _floor(test, quantile)
    main = out[f"tempo[{kinds[0]}]"]["reserved_per_used"]
    if "a" in baselines:
        base = out["baseline_a_dataset_quantile"]["reserved_per_used"]
        floor = out["floor_oracle_median"]["reserved_per_used"]
        out["vs_baseline_a"] = round(1 - main / base, 4)
        out["gap_to_floor_closed"] = round((base - main) / (base - floor), 4) if base > floor else None
    return out


def _cap(samples: LengthSamples, limit: int, seed: int) -> LengthSamples:
    """At most ``limit`` samples (the quantile forest's memory grows with its training rows)."""
    if len(samples) <= limit:
        return samples
    rows = np.sort(np.random.default_rng(seed).choice(len(samples), size=limit, replace=False))
    return samples.subset(rows)


def run_leave_one_model_out(rows: list[LengthRow], prompts: dict[str, str], held_out: str, quantile: float,
                        recal_sizes: list[int], seed: int, n_estimators: int) -> dict[str, Any]:
    """Train on the other models; coverage on the held-out one before and after recalibration."""
    others = [r for r in rows if r.model != held_out]
    target = [r for r in rows if r.model == held_out]
    if not target or not others:
        raise TempoError(f"--leave-one-model-out: model {held_out!r} has no rows, or no other model has")
    train = _split(others, prompts)
    held = _split(target, prompts)
    model = LengthBoundModel(quantile=quantile, seed=seed, model_params={"n_estimators": n_estimators})
    model.fit(train.fit).calibrate(train.calibration)
    test, apps = held.test, held.test.sample_apps

    def score(m: LengthBoundModel) -> dict[str, Any]:
        metrics = bound_metrics(test.lengths, m.predict_bound(test.requests)[test.request_index], apps, quantile)
        return {k: metrics[k] for k in ("coverage", "min_dataset_coverage", "reserved_per_used", "mean_slack_tokens")}

    out: dict[str, Any] = {"held_out": held_out, "before_recalibration": score(model), "after": {}}
    rng = np.random.default_rng(seed)
    cal = held.calibration
    for n in recal_sizes:
        # n completions of distinct prompts where possible, as they would arrive in service
        order = rng.permutation(len(cal))
        _, first = np.unique(cal.request_index[order], return_index=True)
        rows_ = order[np.sort(first)][:n]
        if len(rows_) < n:
            rows_ = np.concatenate([rows_, rng.choice(order, size=n - len(rows_), replace=False)])
        out["after"][str(n)] = score(model.recalibrated(cal.subset(np.sort(rows_))))
    return out


def eval_command(
    json_out: Annotated[Path, typer.Option("--json", help="Write the full results here.")],
    data: Annotated[
        Path | None, typer.Option(help="Lengths file (CASTILLO CSV/JSONL format); default: the vendored one.")
    ] = None,
    prompts: Annotated[
        Path | None, typer.Option(help="Prompts file (JSONL: prompt_id, prompt_text); default: the vendored one.")
    ] = None,
    models: Annotated[
        str,
        typer.Option(help="Served models to evaluate one by one (comma-separated); 'all' for every model in the "
                     "file, 'none' for the pooled model only."),
    ] = "none",
    pooled: Annotated[
        bool, typer.Option(help="Also train one model on every served model (model id as a feature).")
    ] = True,
    quantile: Annotated[float, typer.Option(help="Target coverage q of the upper bound.")] = 0.9,
    kinds: Annotated[
        str, typer.Option(help="Quantile model kinds to compare (lightgbm, hist_gb, qrf); the first is the main one.")
    ] = "lightgbm",
    baselines: Annotated[
        str, typer.Option(help="Baselines to evaluate: a (per-dataset quantile), b (prompt length only), c (the "
                          "paper's forest); comma-separated, or 'none'.")
    ] = "a,b,c",
    leave_one_model_out: Annotated[
        str | None, typer.Option(help="Held-out served model for the transfer test.")
    ] = None,
    recalibrate_n: Annotated[str, typer.Option(help="Recalibration sizes for --leave-one-model-out.")] = "50,100,200",
    n_estimators: Annotated[int, typer.Option(help="Boosting rounds / trees of the main model.")] = 300,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Evaluate calibrated length bounds (coverage, reserved tokens per used token, ladder, latency)."""
    if not 0.5 <= quantile < 1:
        raise TempoError(f"--quantile must be in [0.5, 1), got {quantile}")
    kind_list = [k.strip() for k in kinds.split(",") if k.strip()]
    unknown = [k for k in kind_list if k not in MODEL_KINDS]
    if not kind_list or unknown:
        raise TempoError(f"--kinds: unknown {unknown} (known: {', '.join(MODEL_KINDS)})")
    chosen_baselines = {b.strip() for b in baselines.split(",") if b.strip() and b.strip() != "none"}
    if chosen_baselines - {"a", "b", "c"}:
        raise TempoError(f"--baselines: expected a subset of a,b,c or 'none', got {baselines!r}")
    try:
        sizes = [int(n) for n in recalibrate_n.split(",") if n.strip()]
    except ValueError:
        raise TempoError(f"--recalibrate-n: expected integers, got {recalibrate_n!r}") from None
    data, prompts = data or castillo_lengths_path(), prompts or castillo_prompts_path()
    rows, texts = load_length_rows(data), load_prompts(prompts)
    known = sorted({r.model for r in rows})
    chosen = known if models.strip() in ("all", "") else [] if models.strip() == "none" else [
        m.strip() for m in models.split(",") if m.strip()]
    missing = [m for m in chosen if m not in known]
    if missing:
        raise TempoError(f"--models: {missing} not in {data} (known: {', '.join(known)})")
    targets = [(m, [r for r in rows if r.model == m]) for m in chosen]
    if pooled:
        targets.append(("pooled", rows))
    report: dict[str, Any] = {
        "config": {"data": str(data), "prompts": str(prompts), "quantile": quantile, "kinds": kind_list,
                   "seed": seed, "n_estimators": n_estimators, "split": "sha256(prompt_id): 60/20/20"},
        "results": {},
    }
    console = Console(stderr=True)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("evaluating", total=len(targets) + (1 if leave_one_model_out else 0))
        for name, target_rows in targets:
            progress.update(task, description=f"evaluating {name}")
            progress.console.print(f"[bold]{name}[/]: {len(target_rows)} rows")
            report["results"][name] = evaluate_target(
                _split(target_rows, texts), quantile, kind_list, seed, n_estimators, chosen_baselines, progress)
            progress.advance(task)
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps(report, indent=2))
        if leave_one_model_out:
            progress.update(task, description=f"leave-one-model-out {leave_one_model_out}")
            report["leave_one_model_out"] = run_leave_one_model_out(
                rows, texts, leave_one_model_out, quantile, sizes, seed, n_estimators)
            progress.advance(task)
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(report, indent=2))
    print_report(report, Console(width=max(Console().width, 140)))



def print_report(report: dict[str, Any], console: Console) -> None:
    q = report["config"]["quantile"]
    for target, methods in report["results"].items():
        table = Table(title=f"{target} (q = {q})")
        for column in ("method", "coverage", "min dataset cov", "reserved/used", "slack", "ladder cov 0.5/0.7 B0",
                       "keep-B0 cov 0.5/0.7", "single p50/p99 ms"):
            table.add_column(column, justify="left" if column == "method" else "right")
        for name, m in methods.items():
            if not isinstance(m, dict) or "coverage_by_dataset" not in m:
                continue
            ladder = m.get("ladder", {})
            lat = m.get("latency_ms", {}).get("single", {})
            table.add_row(
                escape(name),
                f"{m['coverage']:.3f}",
                f"{m['min_dataset_coverage']:.3f}",
                f"{m['reserved_per_used']:.3f}",
                f"{m['mean_slack_tokens']:.0f}",
                "/".join(f"{v['coverage_ladder']:.3f}" for v in ladder.values()) if ladder else "-",
                "/".join(f"{v['coverage_keep_b0']:.3f}" for v in ladder.values()) if ladder else "-",
                f"{lat['p50']:.2f}/{lat['p99']:.2f}" if lat else "-",
            )
        console.print(table)
        floor = methods.get("floor_oracle_median", {})
        if "vs_baseline_a" in methods:
            console.print(f"  reserved/used vs baseline (a): {methods['vs_baseline_a']:+.1%} lower; floor "
                          f"{floor.get('reserved_per_used')}; gap to floor closed {methods['gap_to_floor_closed']}")
    lomo = report.get("leave_one_model_out")
    if lomo:
        after = ", ".join(f"N={n}: {v['coverage']:.3f}" for n, v in lomo["after"].items())
        console.print(f"leave-one-model-out {lomo['held_out']}: coverage before "
                      f"{lomo['before_recalibration']['coverage']:.3f}; after recalibration {after}")
