"""``tempo estimator eval``: train, calibrate and evaluate length bounds on held-out prompts, with baselines.

Accepts any lengths file in the CASTILLO format (CSV or JSONL, other models, other prompts) and its
prompts file. Rows are re-split by a hash of the prompt id (fit / calibration / test), per served model
and pooled with the model id as a feature; ``--leave-one-model-out`` also reports coverage on an unseen
model before and after recalibrating on N of its completions (per served model | app, shrunk).

``--train LENGTHS[,PROMPTS] --test LENGTHS[,PROMPTS]`` trains and calibrates on one file (its prompts split
75/25 by hash into fit / calibration) and tests on another, whose prompt ids must not be in the first;
``--subsample F`` keeps a seeded fraction F of the prompts (of ``--data``, or of ``--train``) to measure
small-data behaviour; ``--calibration`` compares calibration methods on the same fitted models (the first
is the main one; the others are reported as ``tempo[kind|method]``).
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import numpy.typing as npt
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table
from tempo.data.castillo import (
    LengthRow,
    castillo_lengths_path,
    castillo_prompts_path,
    load_length_rows,
    load_prompts,
    prompt_split,
    prompt_unit,
)
from tempo.models.artifact import artifact_size_bytes, save_artifact
from tempo.models.calibration import CALIBRATIONS
from tempo.models.dataset import fold_rows, samples_from_rows, split_rows
from tempo.models.evaluation import (
    LadderPoint,
    Split,
    bound_metrics,
    empirical_quantile_bounds,
    ladder_points,
    ladder_summary,
    latency_ms,
    paper_style_model,
    prompt_length_bounds,
)
from tempo.models.length_bounds import LengthBoundModel, LengthSamples
from tempo.models.quantile import MODEL_KINDS

from tempo.errors import TempoError

FloatArray = npt.NDArray[np.float64]
PAPER = "baseline_c_paper_qrf_q0.95"  # baseline (c): always at q = 0.95, as the paper ran it
TRAIN_FRACTIONS = (0.75, 0.25, 0.0)  # --train: fit / calibration by prompt hash (the 60/20 of --data)


def _split(rows: list[LengthRow], prompts: dict[str, str], fold: int | None = None, folds: int = 5,
           test_rows: list[LengthRow] | None = None) -> Split:
    """fit / calibration / test samples: a hash split or fold of ``rows``, or (``test_rows`` given) a
    75/25 fit / calibration split of ``rows`` and ``test_rows`` as the test set."""
    if test_rows is not None:
        parts: dict[str, list[LengthRow]] = {"fit": [], "calibration": [], "test": list(test_rows)}
        for row in rows:
            parts[prompt_split(row.prompt_id, TRAIN_FRACTIONS)].append(row)
    else:
        parts = split_rows(rows) if fold is None else fold_rows(rows, fold, folds)
    if not all(parts.values()):
        empty = [name for name, part in parts.items() if not part]
        prompts_in = len({r.prompt_id for r in rows})
        raise TempoError(f"too few prompts to split into fit, calibration and test ({prompts_in} prompts; "
                         f"empty: {', '.join(empty)})")
    return Split(*(samples_from_rows(parts[name], prompts) for name in ("fit", "calibration", "test")))


def subsample_rows(rows: list[LengthRow], fraction: float, seed: int) -> list[LengthRow]:
    """The rows of a seeded fraction of the prompts (by a salted hash of the prompt id: independent of the
    split, stable across files, and nested: at one seed, the prompts kept at 0.1 are kept at 0.25)."""
    if fraction >= 1:
        return rows
    return [r for r in rows if prompt_unit(r.prompt_id, f"subsample:{seed}:") < fraction]


def _method_name(kind: str, method: str, main: str) -> str:
    return f"tempo[{kind}]" if method == main else f"tempo[{kind}|{method}]"


def _sample_medians(test: LengthSamples) -> FloatArray:
    """Per test sample, the true median length of its prompt (the oracle floor's input)."""
    order = np.argsort(test.request_index, kind="stable")
    starts = np.searchsorted(test.request_index[order], np.arange(len(test.requests) + 1))
    medians = np.array([np.median(test.lengths[order[a:b]]) if b > a else 1.0
                        for a, b in pairwise(starts)])
    return medians[test.request_index]


def _floor(lengths: FloatArray, medians: FloatArray, quantile: float) -> dict[str, Any]:
    """Oracle floor: each prompt's true median times one factor chosen on the test set for coverage q."""
    factor = float(np.quantile(lengths / medians, quantile, method="higher"))
    bound = np.ceil(medians * factor)
    return {"coverage": round(float(np.mean(lengths <= bound)), 4),
            "reserved_per_used": round(float(bound.sum() / lengths.sum()), 4)}


@dataclass
class FoldPredictions:
    """What one fold's test prompts got from every method; folds are concatenated before scoring."""

    lengths: FloatArray
    apps: list[str]
    medians: FloatArray  # true per-prompt median of each sample's prompt
    bounds: dict[str, FloatArray] = field(default_factory=dict)  # per method, per test sample
    predicted_medians: dict[str, FloatArray] = field(default_factory=dict)  # per tempo kind
    ladders: dict[str, dict[float, LadderPoint]] = field(default_factory=dict)  # per tempo kind
    extras: dict[str, dict[str, Any]] = field(default_factory=dict)  # per method: latency, train time, size
    models: list[str] = field(default_factory=list)  # served model of each test sample

    @staticmethod
    def concat(folds: list[FoldPredictions]) -> FoldPredictions:
        first = folds[0]
        return FoldPredictions(
            np.concatenate([f.lengths for f in folds]), [a for f in folds for a in f.apps],
            np.concatenate([f.medians for f in folds]),
            {m: np.concatenate([f.bounds[m] for f in folds]) for m in first.bounds},
            {m: np.concatenate([f.predicted_medians[m] for f in folds]) for m in first.predicted_medians},
            {m: {p: LadderPoint.concat([f.ladders[m][p] for f in folds]) for p in first.ladders[m]}
             for m in first.ladders},
            {m: _merged_extras([f.extras.get(m, {}) for f in folds]) for m in first.extras},
            [m for f in folds for m in f.models],
        )


def calibration_report(model: LengthBoundModel) -> dict[str, Any]:
    """What the calibration rests on: per group its samples, prompts, effective prompts, the own offset's
    weight (shrinkage) and the offset; the pooled offset's effective prompts; the ladder levels'."""
    cal = model.calibration_
    assert cal is not None
    level0 = cal.level0
    groups = level0.summary()
    effective = [v["effective_prompts"] for v in groups.values() if v["effective_prompts"] is not None]
    return {
        "method": model.calibration, "rank": level0.rank, "shrinkage": level0.shrinkage,
        "target": level0.quantile, "pooled_offset": round(level0.pooled_, 4),
        "pooled_effective_prompts": round(level0.pooled_effective_, 1),
        "groups_effective_prompts": {
            "min": min(effective), "median": float(np.median(effective)), "max": max(effective)} if effective else {},
        "groups": groups,
        "ladder_effective_prompts": dict(zip([str(f) for f in cal.fractions], cal.effective, strict=False)),
    }


def _merged_extras(per_fold: list[dict[str, Any]]) -> dict[str, Any]:
    """The first fold's timings and sizes, with the training time averaged over the folds."""
    merged = dict(per_fold[0])
    times = [e["train_s"] for e in per_fold if "train_s" in e]
    if times:
        merged["train_s"] = round(float(np.mean(times)), 1)
    return merged


def predict_fold(split: Split, quantile: float, kinds: list[str], seed: int, n_estimators: int,
                 baselines: set[str], timings: bool = True, progress: Progress | None = None,
                 calibrations: tuple[str, ...] = ("shrink",)) -> FoldPredictions:
    """Train every method on one split's fit (+ calibration) prompts and bound its test samples.

    Each quantile model is fitted once and calibrated with every method of ``calibrations`` (the first is
    the main one). ``timings``: also measure prediction latency and artifact size (once per target is
    enough), and keep the main calibration's groups (samples, prompts, effective prompts, shrinkage)."""
    test = split.test
    out = FoldPredictions(test.lengths, test.sample_apps, _sample_medians(test))
    out.models = [test.requests[i].model or "-" for i in test.request_index]
    main = calibrations[0]
    for kind in kinds:
        params = {"n_estimators": n_estimators} if kind != "hist_gb" else {"max_iter": n_estimators}
        start = time.perf_counter()
        fitted = LengthBoundModel(quantile=quantile, kind=kind, seed=seed, model_params=params).fit(split.fit)
        fit_s = time.perf_counter() - start
        for method in calibrations:
            start = time.perf_counter()
            model = fitted.with_calibration(method).calibrate(split.calibration)
            train_s = fit_s + time.perf_counter() - start
            name = _method_name(kind, method, main)
            out.bounds[name] = model.predict_bound(test.requests)[test.request_index]
            assert model.featurizer_ is not None
            out.predicted_medians[name] = np.exp(model.featurizer_.transform(test.requests)[:, -1])[
                test.request_index]
            out.ladders[name] = ladder_points(model, test)
            extras: dict[str, Any] = {"train_s": train_s}
            if timings and method == main:
                extras["latency_ms"] = {
                    "single": latency_ms(model.predict_ladders, test.requests, 1, 300),
                    "batch256": latency_ms(model.predict_ladders, test.requests, 256, 20),
                }
                with tempfile.TemporaryDirectory() as tmp:
                    save_artifact(model, Path(tmp) / "artifact")
                    extras["artifact_bytes"] = artifact_size_bytes(Path(tmp) / "artifact")
            if timings:
                extras["calibration"] = calibration_report(model)
            out.extras[name] = extras
            if progress is not None:
                covered = float(np.mean(test.lengths <= out.bounds[name]))
                progress.console.print(f"  {escape(name)}: coverage {covered:.4f}, train {train_s:.0f} s")
    both = split.fit_and_calibration()
    if "a" in baselines:
        out.bounds["baseline_a_dataset_quantile"] = empirical_quantile_bounds(both, test, quantile)
        if len({r.model for r in test.requests}) > 1:
            out.bounds["baseline_a_dataset_model_quantile"] = empirical_quantile_bounds(
                both, test, quantile, by_model=True)
    if "b" in baselines:
        out.bounds["baseline_b_prompt_length"] = prompt_length_bounds(
            split.fit, split.calibration, test, quantile, seed)
    if "c" in baselines:
        paper = paper_style_model(seed=seed).fit(_cap(both, 120_000, seed))
        out.bounds[PAPER] = paper.predict_bound(test.requests)[test.request_index]
        if timings:
            out.extras[PAPER] = {"latency_ms": {"single": latency_ms(paper.predict_bound, test.requests, 1, 100)}}
    return out


def score_target(pred: FoldPredictions, quantile: float, main: str) -> dict[str, Any]:
    """Every method's metrics from (possibly concatenated) fold predictions."""
    from scipy.stats import kendalltau

    out: dict[str, Any] = {}
    for name, bound in pred.bounds.items():
        result = bound_metrics(pred.lengths, bound, pred.apps, 0.95 if name == PAPER else quantile)
        if len(set(pred.models)) > 1:
            result["coverage_by_model"] = bound_metrics(
                pred.lengths, bound, pred.models, 0.95 if name == PAPER else quantile)["coverage_by_dataset"]
        if name in pred.predicted_medians:
            tau = kendalltau(pred.predicted_medians[name], pred.lengths).statistic
            result["kendall_tau_median"] = round(float(tau), 4)
            result["ladder"] = ladder_summary(pred.ladders[name])
        result.update(pred.extras.get(name, {}))
        out[name] = result
    out["floor_oracle_median"] = _floor(pred.lengths, pred.medians, quantile)
    if "baseline_a_dataset_quantile" in out:
        base = out["baseline_a_dataset_quantile"]["reserved_per_used"]
        floor = out["floor_oracle_median"]["reserved_per_used"]
        mine = out[main]["reserved_per_used"]
        out["vs_baseline_a"] = round(1 - mine / base, 4)
        out["gap_to_floor_closed"] = round((base - mine) / (base - floor), 4) if base > floor else None
    return out


def evaluate_target(rows: list[LengthRow], prompts: dict[str, str], quantile: float, kinds: list[str], seed: int,
                    n_estimators: int, baselines: set[str], folds: int = 1,
                    progress: Progress | None = None, calibrations: tuple[str, ...] = ("shrink",),
                    test_rows: list[LengthRow] | None = None) -> dict[str, Any]:
    """Every method's metrics on one target (a served model, or all of them pooled).

    ``folds`` = 1: the 60/20/20 hash split. K >= 3: K-fold cross-evaluation by prompt, every prompt tested
    once, metrics over all of them (per-dataset coverage then rests on 5x more test prompts); latency and
    artifact size come from the last fold, which is the 60/20/20 split when K = 5. ``test_rows``: fit and
    calibrate on ``rows`` (75/25 by prompt hash), test on these.
    """
    chosen = [None] if folds == 1 or test_rows is not None else list(range(folds))
    parts, sizes = [], []
    for i, fold in enumerate(chosen):
        if progress is not None and fold is not None:
            progress.console.print(f"  fold {fold + 1}/{folds}")
        split = _split(rows, prompts, fold, folds, test_rows)
        sizes.append({s: len(getattr(split, s)) for s in ("fit", "calibration", "test")})
        parts.append(predict_fold(split, quantile, kinds, seed, n_estimators, baselines,
                                  timings=i == len(chosen) - 1, progress=progress, calibrations=calibrations))
    pred = parts[0] if len(parts) == 1 else FoldPredictions.concat(parts[::-1])
    out = score_target(pred, quantile, f"tempo[{kinds[0]}]")
    out["data"] = sizes[0] if len(chosen) == 1 else {"folds": folds, "samples_per_fold": sizes}
    if test_rows is None:
        out["data"]["prompts"] = len({r.prompt_id for r in rows})
    else:
        out["data"]["prompts"] = {"train": len({r.prompt_id for r in rows}),
                                  "test": len({r.prompt_id for r in test_rows})}
    return out


def _cap(samples: LengthSamples, limit: int, seed: int) -> LengthSamples:
    """At most ``limit`` samples (the quantile forest's memory grows with its training rows)."""
    if len(samples) <= limit:
        return samples
    rows = np.sort(np.random.default_rng(seed).choice(len(samples), size=limit, replace=False))
    return samples.subset(rows)


def run_leave_one_model_out(rows: list[LengthRow], prompts: dict[str, str], held_out: str, quantile: float,
                            recal_sizes: list[int], seed: int, n_estimators: int, draws: int = 20,
                            calibrations: tuple[str, ...] = ("shrink",),
                            test_rows: list[LengthRow] | None = None) -> dict[str, Any]:
    """Train on the other models; coverage on the held-out one before and after recalibrating on N of its
    completions (distinct prompts where possible, as they would arrive in service), per (served model |
    app) group where the completions allow, each shrunk toward the held-out model's pooled offset.

    A deployment is one draw of which prompts it recalibrates on and which it then serves: each of the
    ``draws`` draws splits the held-out model's prompts in two at random (a recalibration pool and the
    traffic it is tested on) and draws N completions from its pool. The mean over draws is what a
    deployment can expect, the 10-90% range how far one may land from it; per dataset, the mean over
    draws of its coverage. (A fixed split would measure one set of ~100 test prompts per dataset: with
    ten correlated samples per prompt, its quantiles differ from the pool's by as much as the
    recalibration corrects.) ``before_recalibration`` is scored on all of the held-out model's prompts.
    ``test_rows``: the base model trains on ``rows`` (75/25), the recalibration completions come from the
    held-out model's rows of ``rows``, and its coverage is measured on its rows of ``test_rows`` (the same
    split every draw). Every method of ``calibrations`` calibrates the same fitted model on the same
    draws (the first is the main one: ``before_recalibration`` and ``after``)."""
    others = [r for r in rows if r.model != held_out]
    target = [r for r in rows if r.model == held_out]
    rng = np.random.default_rng(seed)
    if test_rows is None:
        if not target or not others:
            raise TempoError(f"--leave-one-model-out: model {held_out!r} has no rows, or no other model has")
        if len({r.prompt_id for r in target}) < 2:
            raise TempoError(f"--leave-one-model-out: model {held_out!r} has one prompt; recalibrating and testing "
                             "need two at least")
        train = _split(others, prompts)
        everything = samples_from_rows(target, prompts)
        splits = [_halves(target, prompts, rng) for _ in range(draws)]
    else:
        held_test = [r for r in test_rows if r.model == held_out]
        if not held_test or not others:
            raise TempoError(f"--leave-one-model-out: model {held_out!r} has no rows in --test, or no other "
                             "model has rows in --train")
        if not target:
            raise TempoError(f"--leave-one-model-out: model {held_out!r} has no rows in --train to recalibrate on")
        train = _split(others, prompts, test_rows=held_test)
        everything = train.test
        splits = [(samples_from_rows(target, prompts), train.test)] * draws
    fitted = LengthBoundModel(quantile=quantile, seed=seed, model_params={"n_estimators": n_estimators})
    fitted.fit(train.fit)
    keys = ("coverage", "min_dataset_coverage", "reserved_per_used", "mean_slack_tokens")

    def score(m: LengthBoundModel, test: LengthSamples) -> dict[str, Any]:
        metrics = bound_metrics(test.lengths, m.predict_bound(test.requests)[test.request_index], test.sample_apps,
                                quantile)
        out = {k: metrics[k] for k in keys}
        out["coverage_by_dataset"] = {a: v["coverage"] for a, v in metrics["coverage_by_dataset"].items()}
        return out

    def summary(results: list[dict[str, Any]]) -> dict[str, Any]:
        coverage = np.array([r["coverage"] for r in results])
        datasets = sorted(set().union(*(r["coverage_by_dataset"] for r in results)))
        by_dataset = {a: round(float(np.mean([r["coverage_by_dataset"][a] for r in results
                                              if a in r["coverage_by_dataset"]])), 4) for a in datasets}
        return {
            **{k: round(float(np.mean([r[k] for r in results])), 4) for k in keys},
            "coverage_p10": round(float(np.percentile(coverage, 10)), 4),
            "coverage_p90": round(float(np.percentile(coverage, 90)), 4),
            "coverage_by_dataset": by_dataset,
            "min_dataset_mean_coverage": min(by_dataset.values()),
        }

    pool, test = splits[0]
    out: dict[str, Any] = {"held_out": held_out, "draws": draws,
                           "split": "fixed (--test)" if test_rows is not None else "random halves of the held-out "
                                                                                   "model's prompts, per draw",
                           "recalibration_pool": {"samples": len(pool),
                                                  "prompts": len(set(pool.sample_units.tolist()))},
                           "test": {"samples": len(test), "prompts": len(set(test.sample_units.tolist()))}}
    picks = {n: [_draw_completions(pool, n, rng) for pool, _ in splits] for n in recal_sizes}
    for method in calibrations:
        model = fitted.with_calibration(method).calibrate(train.calibration)
        after: dict[str, Any] = {}
        groups: dict[str, Any] = {}
        for n in recal_sizes:
            results = []
            for draw, ((pool, test), rows_n) in enumerate(zip(splits, picks[n], strict=True)):
                recal = model.recalibrated(pool.subset(rows_n))
                results.append(score(recal, test))
                if draw == 0:
                    assert recal.calibration_ is not None
                    groups[str(n)] = recal.calibration_.level0.summary()
            after[str(n)] = summary(results)
        result = {"before_recalibration": score(model, everything), "after": after,
                  "recalibration_groups_first_draw": groups}
        if method == calibrations[0]:
            out.update(result)
        out.setdefault("by_calibration", {})[method] = result
    return out


def _halves(rows: list[LengthRow], prompts: dict[str, str],
            rng: np.random.Generator) -> tuple[LengthSamples, LengthSamples]:
    """The samples of a random half of the prompts of ``rows`` and of the other half."""
    ids = sorted({r.prompt_id for r in rows})
    first = {ids[i] for i in rng.permutation(len(ids))[: max(1, len(ids) // 2)]}
    return (samples_from_rows([r for r in rows if r.prompt_id in first], prompts),
            samples_from_rows([r for r in rows if r.prompt_id not in first], prompts))


def _draw_completions(pool: LengthSamples, n: int, rng: np.random.Generator) -> npt.NDArray[np.int64]:
    """Rows of ``n`` completions of ``pool``: one per prompt while prompts last, then any."""
    order = rng.permutation(len(pool))
    _, first = np.unique(pool.request_index[order], return_index=True)
    rows = order[np.sort(first)][:n]
    if len(rows) < n:
        rest = np.setdiff1d(order, rows)
        rows = np.concatenate([rows, rng.choice(rest, size=min(n - len(rows), len(rest)), replace=False)])
    return np.sort(rows)


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
    folds: Annotated[
        int, typer.Option(help="1: one 60/20/20 split by prompt hash. K >= 3: K-fold cross-evaluation by prompt "
                          "(every prompt tested once and calibrates once; K times the training), for per-dataset "
                          "figures that do not rest on a fifth of the prompts.")
    ] = 1,
    draws: Annotated[
        int, typer.Option(help="--leave-one-model-out: random draws of the N recalibration completions; the "
                          "report gives their mean coverage and spread.")
    ] = 20,
    n_estimators: Annotated[int, typer.Option(help="Boosting rounds / trees of the main model.")] = 300,
    seed: Annotated[int, typer.Option(help="Random seed (of the models, the draws and --subsample).")] = 0,
    train: Annotated[
        str | None, typer.Option(help="LENGTHS[,PROMPTS]: train and calibrate on this file (its prompts split 75/25 "
                                 "by hash into fit / calibration); needs --test. Without PROMPTS, no prompt text.")
    ] = None,
    test: Annotated[
        str | None, typer.Option(help="LENGTHS[,PROMPTS]: test on this file; its prompt ids must not be in --train.")
    ] = None,
    drop_overlap: Annotated[
        bool, typer.Option(help="--train/--test: drop the test rows whose prompt id is in --train instead of "
                           "refusing them.")
    ] = False,
    subsample: Annotated[
        float, typer.Option(help="Keep this fraction of the prompts (seeded by --seed; of --data, or of --train), "
                            "all of their rows: small-data behaviour.")
    ] = 1.0,
    calibration: Annotated[
        str, typer.Option(help=f"Calibration methods ({', '.join(CALIBRATIONS)}), comma-separated: the first is "
                          "the main one, the others calibrate the same fitted models for comparison "
                          "(tempo[kind|method]). 'sample' is the calibration before issue #14.")
    ] = "shrink",
) -> None:
    """Evaluate calibrated length bounds (coverage, reserved tokens per used token, ladder, latency)."""
    if not 0.5 <= quantile < 1:
        raise TempoError(f"--quantile must be in [0.5, 1), got {quantile}")
    kind_list = [k.strip() for k in kinds.split(",") if k.strip()]
    unknown = [k for k in kind_list if k not in MODEL_KINDS]
    if not kind_list or unknown:
        raise TempoError(f"--kinds: unknown {unknown} (known: {', '.join(MODEL_KINDS)})")
    chosen_baselines = {b.strip() for b in baselines.split(",") if b.strip() and b.strip() != "none"}
    if folds < 1 or folds == 2 or draws < 1:
        raise TempoError(f"--folds must be 1 or at least 3 and --draws at least 1, got {folds} and {draws}")
    if chosen_baselines - {"a", "b", "c"}:
        raise TempoError(f"--baselines: expected a subset of a,b,c or 'none', got {baselines!r}")
    try:
        sizes = [int(n) for n in recalibrate_n.split(",") if n.strip()]
    except ValueError:
        raise TempoError(f"--recalibrate-n: expected integers, got {recalibrate_n!r}") from None
    if leave_one_model_out and (not sizes or min(sizes) < 1):
        raise TempoError(f"--recalibrate-n: expected positive integers, got {recalibrate_n!r}")
    if not 0 < subsample <= 1:
        raise TempoError(f"--subsample must be in (0, 1], got {subsample}")
    methods = tuple(dict.fromkeys(m.strip() for m in calibration.split(",") if m.strip()))
    if not methods or any(m not in CALIBRATIONS for m in methods):
        raise TempoError(f"--calibration: expected some of {', '.join(CALIBRATIONS)}, got {calibration!r}")
    if (train is None) != (test is None):
        raise TempoError("--train and --test go together (train on one file, test on the other)")
    test_rows: list[LengthRow] | None = None
    overlap: dict[str, Any] = {}
    if train is not None and test is not None:
        if data is not None or prompts is not None:
            raise TempoError("--train/--test replace --data/--prompts: give one or the other")
        if folds != 1:
            raise TempoError("--folds applies to --data; with --train/--test the test file is the test set")
        (data, prompts), (test_data, test_prompts) = _file_pair(train, "--train"), _file_pair(test, "--test")
        rows, texts = load_length_rows(data), load_prompts(prompts) if prompts else {}
        test_rows = load_length_rows(test_data)
        test_texts = load_prompts(test_prompts) if test_prompts else {}
        shared = sorted({r.prompt_id for r in rows} & {r.prompt_id for r in test_rows})
        if shared and not drop_overlap:
            raise TempoError(
                f"--train and --test share {len(shared)} prompt ids (e.g. {shared[0]!r}): a prompt in both would "
                "be tested on lengths it was trained on; remove them from one file, or pass --drop-overlap")
        if shared:
            dropped = set(shared)
            overlap = {"dropped_test_prompts": len(dropped),
                       "dropped_test_rows": sum(r.prompt_id in dropped for r in test_rows)}
            test_rows = [r for r in test_rows if r.prompt_id not in dropped]
            if not test_rows:
                raise TempoError("--drop-overlap: every prompt of --test is in --train: nothing left to test")
        conflicting = [k for k in test_texts if k in texts and texts[k] != test_texts[k]]
        if conflicting:
            raise TempoError(f"the prompts files of --train and --test give prompt id {conflicting[0]!r} different "
                             "texts")
        texts = {**texts, **test_texts}
    else:
        data, prompts = data or castillo_lengths_path(), prompts or castillo_prompts_path()
        rows, texts = load_length_rows(data), load_prompts(prompts)
        test_data, test_prompts = None, None
    all_prompts = len({r.prompt_id for r in rows})
    rows = subsample_rows(rows, subsample, seed)
    if not rows:
        raise TempoError(f"--subsample {subsample} kept none of the {all_prompts} prompts of {data}")
    known = sorted({r.model for r in rows})
    chosen = known if models.strip() in ("all", "") else [] if models.strip() == "none" else [
        m.strip() for m in models.split(",") if m.strip()]
    missing = [m for m in chosen if m not in known]
    if missing:
        raise TempoError(f"--models: {missing} not in {data} (known: {', '.join(known)})")
    if test_rows is not None:
        untested = [m for m in chosen if not any(r.model == m for r in test_rows)]
        if untested:
            raise TempoError(f"--models: {untested} have no rows in {test_data}")
    targets = [(m, [r for r in rows if r.model == m],
                None if test_rows is None else [r for r in test_rows if r.model == m]) for m in chosen]
    if pooled:
        targets.append(("pooled", rows, test_rows))
    without_text = sum(r.prompt_id not in texts for r in rows + (test_rows or []))
    if test_rows is None:
        split_name = "sha256(prompt_id): 60/20/20" if folds == 1 else f"sha256(prompt_id): {folds} folds"
    else:
        split_name = "--train: sha256(prompt_id) 75/25 fit / calibration; --test: all rows"
    report: dict[str, Any] = {
        "config": {"data": str(data), "prompts": str(prompts), "quantile": quantile, "kinds": kind_list,
                   "seed": seed, "n_estimators": n_estimators, "folds": folds, "split": split_name,
                   "calibration": list(methods), "subsample": subsample,
                   "prompts_kept": len({r.prompt_id for r in rows}), "prompts_in_file": all_prompts,
                   **({"test": str(test_data), "test_prompts": str(test_prompts), **overlap}
                      if test_rows is not None else {}),
                   "rows_without_prompt_text": without_text},
        "results": {},
    }
    console = Console(stderr=True)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("evaluating", total=len(targets) + (1 if leave_one_model_out else 0))
        if without_text:
            progress.console.print(f"[yellow]{without_text} rows have no prompt text: they are bounded from the "
                                   "prompt length and metadata only[/]")
        for name, target_rows, target_test in targets:
            progress.update(task, description=f"evaluating {name}")
            progress.console.print(f"[bold]{name}[/]: {len(target_rows)} rows")
            report["results"][name] = evaluate_target(
                target_rows, texts, quantile, kind_list, seed, n_estimators, chosen_baselines, folds, progress,
                methods, target_test)
            progress.advance(task)
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps(report, indent=2))
        if leave_one_model_out:
            progress.update(task, description=f"leave-one-model-out {leave_one_model_out}")
            report["leave_one_model_out"] = run_leave_one_model_out(
                rows, texts, leave_one_model_out, quantile, sizes, seed, n_estimators, draws, methods, test_rows)
            progress.advance(task)
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(report, indent=2))
    print_report(report, Console(width=max(Console().width, 140)))


def _file_pair(value: str, option: str) -> tuple[Path, Path | None]:
    """``LENGTHS[,PROMPTS]`` as paths (TempoError for more than two, or an empty one)."""
    parts = [p.strip() for p in value.split(",")]
    if len(parts) > 2 or not all(parts):
        raise TempoError(f"{option}: expected LENGTHS or LENGTHS,PROMPTS, got {value!r}")
    return Path(parts[0]), Path(parts[1]) if len(parts) == 2 else None


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
        for method, result in lomo.get("by_calibration", {"": lomo}).items():
            after = ", ".join(
                f"N={n}: {v['coverage']:.3f} (p10-p90 {v.get('coverage_p10', 0):.3f}-{v.get('coverage_p90', 0):.3f}"
                + (f"; min dataset {v['min_dataset_mean_coverage']:.3f}" if "min_dataset_mean_coverage" in v else "")
                + ")" for n, v in result["after"].items())
            label = f" [{escape(method)}]" if method else ""
            console.print(f"leave-one-model-out {lomo['held_out']}{label}: coverage before "
                          f"{result['before_recalibration']['coverage']:.3f}; after recalibration {after}")
