"""``tempo estimator eval-graphs``: the pattern-graph store against the per-app quantiles, on held-out jobs.

Trains a ``GraphStore`` (online, job by job, as the service would; its bound calibrated leave-one-out on the
stored jobs) on a seeded random part of the jobs of a workflows file and estimates, for every held-out job at
every stage s (0-based: stages < s finished, stage s's prompts known), what remains after stage s. Reports per
stage the median and p90 absolute error of the point estimate (the weighted median of the matches; for the
fallback the per-app median, ``JobProfile`` at q = 0.5, so a median is compared with a median), the coverage
of the bound (the calibrated q-quantile; ``JobProfile`` at q) and how far the bound overshoots, for the
critical-path decode tokens, the total tokens and the stages after s. Then match latency with 100, 500 and
2,000 stored graphs and the store's memory over a stream of 10x its capacity in jobs; graphs beyond the
file's training jobs are resampled from them with lognormal token noise (the output says how many). And
``predictability``: general regressors fitted on the same attributes, to tell a matcher that misses what is
there from a file whose early stages do not carry it.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import numpy.typing as npt
import typer
from rich.console import Console
from rich.table import Table
from tempo.data.castillo import open_text
from tempo.models.job_graphs import FIELDS, PR_MAX, GraphStore, PatternGraph, remaining_after
from tempo.scheduler.jobs import JobProfile, quantile_up
from tempo.serving.workloads.builder import COMPOUND_APP
from tempo.serving.workloads.sources import load_workflows

from tempo.errors import TempoError

FloatArray = npt.NDArray[np.float64]
Graph = tuple[tuple[tuple[int, int], ...], ...]
REPORTED = ("decode_tokens_after", "tokens_after", "stages_after")  # the figures of the table
PROFILE_FIELDS = ("stages_after", "decode_tokens_after", "prefill_tokens_after")  # what JobProfile bounds
NOISE_SIGMA = 0.25  # lognormal noise of resampled graphs (latency and memory runs)
QUERIES = 2000  # timed outlooks per store size


@dataclass(frozen=True, slots=True)
class Job:
    app: str
    graph: Graph


def load_jobs(path: Path) -> list[Job]:
    """Jobs of a deep-research-format file (``load_workflows``), with each job's optional ``app`` field."""
    if not path.is_file():
        raise TempoError(f"{path}: no such file")
    workflows = load_workflows(path)
    with open_text(path) as handle:
        raw = json.load(handle)
    apps: dict[str, list[str]] = defaultdict(list)
    for item in raw:
        app = item.get("app", COMPOUND_APP) if isinstance(item, dict) else COMPOUND_APP
        if not isinstance(app, str) or not app:
            raise TempoError(f"{path}: job {item.get('request_id')!r}: 'app' must be a non-empty string")
        apps[str(item.get("request_id"))].append(app)
    jobs = []
    for workflow in workflows:
        queue = apps.get(workflow.workflow_id)
        app = queue.pop(0) if queue else COMPOUND_APP
        jobs.append(Job(app, tuple(tuple((c.input_tokens, c.output_tokens) for c in s) for s in workflow.stages)))
    return jobs


def split_jobs(jobs: Sequence[Job], train_frac: float, seed: int) -> tuple[list[Job], list[Job]]:
    if not 0 < train_frac < 1:
        raise TempoError(f"--train-frac must be in (0, 1), got {train_frac}")
    order = np.random.default_rng(seed).permutation(len(jobs))
    n_train = round(train_frac * len(jobs))
    if n_train < 1 or n_train >= len(jobs):
        raise TempoError(f"{len(jobs)} jobs are too few to split {train_frac:.2f} / {1 - train_frac:.2f} "
                         "into training and held-out jobs")
    return [jobs[i] for i in order[:n_train]], [jobs[i] for i in order[n_train:]]


def perturbed(job: Job, rng: np.random.Generator, sigma: float = NOISE_SIGMA) -> Job:
    """A resampled job: the same shape, every call's tokens times lognormal(0, sigma)."""
    def noisy(tokens: int) -> int:
        return max(1, round(tokens * float(rng.lognormal(0.0, sigma))))

    return Job(job.app, tuple(tuple((noisy(p), noisy(o)) for p, o in stage) for stage in job.graph))


def _stats(errors: Sequence[float]) -> dict[str, float]:
    a = np.asarray(errors, dtype=float)
    return {"p50": round(float(np.median(a)), 2), "p90": round(float(np.quantile(a, 0.9)), 2),
            "mean": round(float(a.mean()), 2)}


class _Fallback:
    """The per-app quantiles: ``JobProfile.fit`` at q (bound) and at 0.5 (point) for what it bounds; the same
    rule (``quantile_up`` over the training jobs that reached the stage, per app) for the totals it only
    averages."""

    def __init__(self, train: Sequence[Job], quantile: float) -> None:
        pairs = [(job.app, job.graph) for job in train]
        self.bound_profile = JobProfile.fit(pairs, quantile)
        self.point_profile = JobProfile.fit(pairs, 0.5)
        self.quantile = quantile
        self.seen: dict[tuple[str, int], list[FloatArray]] = defaultdict(list)
        for job in train:
            remaining, _ = remaining_after(job.graph)
            for stage, row in enumerate(remaining):
                self.seen[job.app, stage].append(row)

    def estimate(self, app: str, stage: int) -> tuple[dict[str, float], dict[str, float]]:
        rows = self.seen.get((app, stage), [])
        point = {f: quantile_up([float(r[i]) for r in rows], 0.5) if rows else 0.0 for i, f in enumerate(FIELDS)}
        bound = {f: quantile_up([float(r[i]) for r in rows], self.quantile) if rows else 0.0
                 for i, f in enumerate(FIELDS)}
        for profile, target in ((self.point_profile, point), (self.bound_profile, bound)):
            outlook = profile.outlook(app, stage)
            for name in PROFILE_FIELDS:
                target[name] = float(getattr(outlook, name))
        return point, bound


def accuracy(store: GraphStore, fallback: _Fallback, test: Sequence[Job]) -> dict[str, Any]:
    """Per stage, for the graph store and the fallback: point errors, bound coverage and overshoot."""
    rows: dict[int, dict[str, Any]] = defaultdict(lambda: {"n": 0, "fallback": 0, "samples": [], "phi_true": [],
                                                           "phi": [], "unseen_app": 0,
                                                           "graph": defaultdict(list), "profile": defaultdict(list)})
    seen_apps = set(store.apps())
    for job in test:
        truth, phi_true = remaining_after(job.graph)
        for stage in range(len(job.graph)):
            row = rows[stage]
            row["n"] += 1
            row["unseen_app"] += job.app not in seen_apps
            estimate = store.estimate(job.app, stage, job.graph[:stage], [p for p, _ in job.graph[stage]])
            row["fallback"] += estimate.fallback
            row["samples"].append(estimate.samples)
            if estimate.sub_deadline_fraction is not None:
                row["phi"].append(estimate.sub_deadline_fraction)
                row["phi_true"].append(float(phi_true[stage]))
            point, bound = fallback.estimate(job.app, stage)
            for method, (p, b) in (("graph", (estimate.median, estimate.bound)), ("profile", (point, bound))):
                for i, name in enumerate(FIELDS):
                    true = float(truth[stage, i])
                    row[method][name].append((abs(p[name] - true), b[name] >= true, b[name] - true))
    report: dict[str, Any] = {}
    pooled: dict[str, dict[str, list[bool]]] = {"graph": defaultdict(list), "profile": defaultdict(list)}
    for stage in sorted(rows):
        row = rows[stage]
        entry: dict[str, Any] = {"jobs": row["n"], "graph_fallback_rate": round(row["fallback"] / row["n"], 4),
                                 "graph_samples_median": round(float(np.median(row["samples"])), 1),
                                 "unseen_app_jobs": row["unseen_app"]}
        if row["phi"]:
            early = np.asarray(row["phi"]) <= np.asarray(row["phi_true"]) + 1e-9
            entry["phi_early_rate"] = round(float(early.mean()), 4)  # sub-deadline no later than the truth's
        for name in FIELDS:
            figures: dict[str, Any] = {}
            for method in ("graph", "profile"):
                values = row[method][name]
                errors = [v[0] for v in values]
                covered = [v[1] for v in values]
                pooled[method][name] += covered
                figures[method] = {"point_abs_error": _stats(errors),
                                   "bound_coverage": round(float(np.mean(covered)), 4),
                                   "bound_overshoot": _stats([v[2] for v in values])}
            fallback_error = figures["profile"]["point_abs_error"]
            graph_error = figures["graph"]["point_abs_error"]
            figures["error_ratio_p50"] = _ratio(graph_error["p50"], fallback_error["p50"])
            figures["error_ratio_mean"] = _ratio(graph_error["mean"], fallback_error["mean"])
            figures["overshoot_ratio_mean"] = _ratio(abs(figures["graph"]["bound_overshoot"]["mean"]),
                                                     abs(figures["profile"]["bound_overshoot"]["mean"]))
            entry[name] = figures
        report[str(stage)] = entry
    coverage = {method: {name: round(float(np.mean(v)), 4) for name, v in fields.items()}
                for method, fields in pooled.items()}
    return {"per_stage": report, "coverage_all_stages": coverage}


MIN_JOBS_PREDICTABILITY = 20  # training jobs that reached a stage, per learner fit


def _known_at(graph: Graph, stage: int) -> list[float]:
    """What a job shows when stage ``stage`` is released: per finished stage the kernel's attributes (fan-out,
    longest and total output, longest and total prompt), then the current stage's fan-out and prompts; logs."""
    stats = PatternGraph(graph[:stage], [p for p, _ in graph[stage]]).stats  # the current stage's outputs: -1
    return list(np.log1p([*stats[:-1].ravel(), *stats[-1, PR_MAX:]]))


def predictability(train: Sequence[Job], test: Sequence[Job], fallback: _Fallback,
                   target: str = "decode_tokens_after") -> dict[str, Any]:
    """How much of ``target`` after each stage the attributes known then can predict at all, whatever the
    method: general regressors fitted on the training jobs that reached the stage (gradient boosting and
    a linear median regression on ``_known_at`` plus the app; k nearest neighbours within the app) against
    the per-app median, as the mean absolute error ratio on the held-out jobs (the graph store's is the
    ``error_ratio_mean`` of ``per_stage``). ``true_stages`` is the per-app median of training jobs with the
    job's true stage count: what knowing only how deep the job goes would give. A stage with fewer than
    ``MIN_JOBS_PREDICTABILITY`` training jobs is left out."""
    from sklearn.ensemble import GradientBoostingRegressor
    from sklearn.linear_model import QuantileRegressor
    from sklearn.neighbors import KNeighborsRegressor

    index = FIELDS.index(target)
    apps = sorted({job.app for job in train})
    out: dict[str, Any] = {}
    for stage in range(max(len(job.graph) for job in train)):
        def rows(jobs: Sequence[Job], s: int = stage) -> tuple[list[Job], FloatArray, FloatArray]:
            kept = [job for job in jobs if len(job.graph) > s]
            x = np.array([[*_known_at(j.graph, s), *(float(j.app == a) for a in apps)] for j in kept])
            y = np.array([remaining_after(j.graph)[0][s, index] for j in kept])
            return kept, x.reshape(len(kept), -1), y

        fit_jobs, x_fit, y_fit = rows(train)
        held, x_held, y_held = rows(test)
        if len(fit_jobs) < MIN_JOBS_PREDICTABILITY or not held:
            continue
        baseline = np.array([fallback.estimate(job.app, stage)[0][target] for job in held])
        base_error = float(np.abs(baseline - y_held).mean())
        predictions: dict[str, FloatArray] = {}
        for name, learner in (
                ("gradient_boosting", GradientBoostingRegressor(loss="absolute_error", n_estimators=200,
                                                                max_depth=2, learning_rate=0.05, random_state=0)),
                ("linear_median", QuantileRegressor(quantile=0.5, alpha=0.0, solver="highs"))):
            predictions[name] = learner.fit(x_fit, y_fit).predict(x_held)
        knn = np.empty(len(held))
        for app in {job.app for job in held}:
            mine = np.array([job.app == app for job in held])
            theirs = np.array([job.app == app for job in fit_jobs])
            if theirs.sum() == 0:
                knn[mine] = baseline[mine]
                continue
            model = KNeighborsRegressor(min(25, int(theirs.sum()))).fit(x_fit[theirs], y_fit[theirs])
            knn[mine] = model.predict(x_held[mine])
        predictions["nearest_neighbours"] = knn
        depth = [len(job.graph) for job in fit_jobs]
        predictions["true_stages"] = np.array([
            np.median([y for y, j, d in zip(y_fit, fit_jobs, depth, strict=True)
                       if j.app == job.app and d == len(job.graph)] or [b])
            for job, b in zip(held, baseline, strict=True)])
        out[str(stage)] = {"jobs_train": len(fit_jobs), "jobs_test": len(held),
                           "per_app_median_error_mean": round(base_error, 2),
                           "error_ratio_mean": {name: _ratio(float(np.abs(p - y_held).mean()), base_error)
                                                for name, p in predictions.items()}}
    return out


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 4) if b > 0 else None


def _grown(train: Sequence[Job], size: int, rng: np.random.Generator) -> tuple[list[Job], int]:
    """``size`` jobs: the training jobs, then resampled ones; returns them and how many were resampled."""
    jobs = list(train[:size])
    synthetic = size - len(jobs)
    jobs += [perturbed(train[int(rng.integers(len(train)))], rng) for _ in range(synthetic)]
    return jobs, synthetic


def latency(train: Sequence[Job], test: Sequence[Job], sizes: Sequence[int], quantile: float,
            seed: int) -> dict[str, Any]:
    """p50 / p99 of one ``outlook`` (what the scheduler calls per compound call) with ``size`` stored graphs."""
    rng = np.random.default_rng(seed + 1)
    results: dict[str, Any] = {}
    queries = [(job, int(rng.integers(len(job.graph)))) for job in (test[int(rng.integers(len(test)))]
                                                                     for _ in range(QUERIES))]
    for size in sizes:
        jobs, synthetic = _grown(train, size, rng)
        store = GraphStore(capacity=max(size, 2), quantile=quantile, seed=seed)
        for job in jobs:
            store.add(job.app, job.graph)
        timings = np.empty(len(queries))
        for i, (job, stage) in enumerate(queries):
            history, prompts = job.graph[:stage], [p for p, _ in job.graph[stage]]
            start = time.perf_counter()
            store.outlook(job.app, stage, history, prompts)
            timings[i] = time.perf_counter() - start
        results[str(size)] = {"stored": len(store), "resampled": synthetic,
                              "p50_ms": round(float(np.quantile(timings, 0.5)) * 1e3, 4),
                              "p99_ms": round(float(np.quantile(timings, 0.99)) * 1e3, 4),
                              "nbytes": store.nbytes()}
    return results


def _decode_coverage(store: GraphStore, jobs: Sequence[Job]) -> float:
    covered = []
    decode = FIELDS.index("decode_tokens_after")
    for job in jobs:
        truth, _ = remaining_after(job.graph)
        for stage in range(len(job.graph)):
            estimate = store.estimate(job.app, stage, job.graph[:stage], [p for p, _ in job.graph[stage]])
            covered.append(estimate.bound["decode_tokens_after"] >= truth[stage, decode])
    return round(float(np.mean(covered)), 4)


def memory(train: Sequence[Job], test: Sequence[Job], capacity: int, factor: int, quantile: float,
           seed: int) -> dict[str, Any]:
    """Stored graphs and bytes over a stream of ``factor`` x ``capacity`` resampled jobs (checkpoints, and the
    range after the first ``capacity`` jobs), and the decode bound's coverage on resampled held-out jobs (the
    stream's distribution) when the store first fills up and at the end, consolidated many times over."""
    rng = np.random.default_rng(seed + 2)
    held_out = [perturbed(job, rng) for job in test]
    store = GraphStore(capacity=capacity, quantile=quantile, seed=seed)
    checkpoints, late = [], []
    total = factor * capacity
    every = max(1, capacity // 2)
    coverage_full = None
    elapsed = 0.0
    for i in range(1, total + 1):
        job = perturbed(train[int(rng.integers(len(train)))], rng)
        start = time.perf_counter()
        store.add(job.app, job.graph)
        elapsed += time.perf_counter() - start
        if i >= capacity:
            late.append(store.nbytes())
        if i == capacity:
            coverage_full = _decode_coverage(store, held_out)
        if i % every == 0 or i == total:
            checkpoints.append({"jobs": i, "stored": len(store), "nbytes": store.nbytes()})
    return {"capacity_per_app": capacity, "jobs": total, "resampled": total, "checkpoints": checkpoints,
            "stored_per_app_end": store.apps(),
            "nbytes_min_after_capacity": min(late) if late else None,
            "nbytes_max_after_capacity": max(late) if late else None,
            "add_ms_mean": round(elapsed / total * 1e3, 3),
            "decode_bound_coverage_when_full": coverage_full,
            "decode_bound_coverage_end": _decode_coverage(store, held_out)}


def evaluate(path: Path, train_frac: float = 0.5, seed: int = 0, quantile: float = 0.9, capacity: int = 500,
             latency_sizes: Sequence[int] = (100, 500, 2000), stream_factor: int = 10) -> dict[str, Any]:
    """The whole report (see the module docstring)."""
    if not 0 < quantile < 1:
        raise TempoError(f"--quantile must be in (0, 1), got {quantile}")
    if capacity < 2:
        raise TempoError(f"--capacity must be >= 2, got {capacity}")
    jobs = load_jobs(path)
    train, test = split_jobs(jobs, train_frac, seed)
    store = GraphStore(capacity=capacity, quantile=quantile, seed=seed)
    start = time.perf_counter()
    for job in train:
        store.add(job.app, job.graph)
    train_s = time.perf_counter() - start
    shapes: dict[int, int] = defaultdict(int)
    for job in jobs:
        shapes[len(job.graph)] += 1
    report: dict[str, Any] = {
        "data": str(path), "seed": seed, "quantile": quantile, "train_frac": train_frac,
        "jobs": {"total": len(jobs), "train": len(train), "test": len(test),
                 "apps": sorted({job.app for job in jobs}),
                 "test_apps_unseen": sorted({j.app for j in test} - {j.app for j in train}),
                 "stages": {str(k): v for k, v in sorted(shapes.items())}},
        "store": {"capacity": capacity, "stored": len(store), "nbytes": store.nbytes(),
                  "train_s": round(train_s, 3), "calibration": store.calibration()},
        "method": {
            "graph_point": "weighted median of the matched graphs",
            "graph_bound": "weighted q-quantile of the matches with a conformal log offset per stage, from the "
                           "stored training jobs each matched against the store without it (leave-one-out)",
            "fallback_point": "JobProfile.fit(train, 0.5) (stages, critical-path tokens); per-app median of the "
                              "totals",
            "fallback_bound": "JobProfile.fit(train, q); per-app q-quantile of the totals",
            "error": "absolute error of the point estimate; ratio = graph / fallback",
            "coverage": "fraction of held-out (job, stage) with true remaining <= bound",
        },
    }
    fallback = _Fallback(train, quantile)
    report.update(accuracy(store, fallback, test))
    report["predictability"] = predictability(train, test, fallback)
    report["latency"] = latency(train, test, latency_sizes, quantile, seed)
    report["latency_note"] = (f"stores beyond the {len(train)} training jobs are filled with training jobs "
                              f"resampled with lognormal(0, {NOISE_SIGMA}) token noise; {QUERIES} timed outlooks "
                              "of held-out jobs at random stages")
    report["memory"] = memory(train, test, capacity, stream_factor, quantile, seed)
    report["memory_note"] = (f"a stream of {stream_factor}x capacity training jobs resampled with lognormal(0, "
                             f"{NOISE_SIGMA}) token noise; coverage on the held-out jobs resampled the same way")
    return report


def print_report(report: dict[str, Any], console: Console) -> None:
    q = report["quantile"]
    titles = {"decode_tokens_after": "critical-path decode tokens", "tokens_after": "total tokens",
              "stages_after": "stages"}
    for name in REPORTED:
        table = Table(title=f"{titles[name]} after stage s: graph store vs per-app quantiles (q={q})",
                      caption="error: |median - true| p50 / p90; cov: held-out fraction <= the bound; "
                              "fb: graph estimates that fell back")
        for column in ("s", "jobs", "fb", "graph err", "fallback err", "ratio p50", "cov graph", "cov fallback"):
            table.add_column(column, justify="right")
        for stage, entry in report["per_stage"].items():
            figures = entry[name]
            g, f = figures["graph"], figures["profile"]
            ratio = figures["error_ratio_p50"]
            table.add_row(stage, str(entry["jobs"]), f"{100 * entry['graph_fallback_rate']:.0f}%",
                          f"{g['point_abs_error']['p50']:.0f} / {g['point_abs_error']['p90']:.0f}",
                          f"{f['point_abs_error']['p50']:.0f} / {f['point_abs_error']['p90']:.0f}",
                          "-" if ratio is None else f"{ratio:.2f}",
                          f"{g['bound_coverage']:.3f}", f"{f['bound_coverage']:.3f}")
        console.print(table)
    if report.get("predictability"):
        table = Table(title="what the attributes known at stage s can predict: critical-path decode tokens after "
                            "s, mean |error| / the per-app median's",
                      caption="general regressors on the same attributes; 'true stages': the per-app median of "
                              "jobs as deep as the job (an oracle of depth alone)")
        learners = ("gradient_boosting", "linear_median", "nearest_neighbours", "true_stages")
        for column in ("s", "jobs", "graph store", *(n.replace("_", " ") for n in learners)):
            table.add_column(column, justify="right")
        for stage, entry in report["predictability"].items():
            graph = report["per_stage"][stage]["decode_tokens_after"]["error_ratio_mean"]
            ratios = [entry["error_ratio_mean"][n] for n in learners]
            table.add_row(stage, str(entry["jobs_test"]),
                          *("-" if r is None else f"{r:.2f}" for r in (graph, *ratios)))
        console.print(table)
    coverage = report["coverage_all_stages"]
    console.print("coverage over all stages (graph / fallback): " + ", ".join(
        f"{titles[name]} {coverage['graph'][name]:.3f} / {coverage['profile'][name]:.3f}" for name in REPORTED))
    lat = "; ".join(f"{size}: p50 {v['p50_ms']:.3f} ms, p99 {v['p99_ms']:.3f} ms ({v['resampled']} resampled)"
                    for size, v in report["latency"].items())
    console.print(f"match latency of one outlook with N stored graphs: {lat}")
    m = report["memory"]
    points = ", ".join(f"{c['jobs']}: {c['stored']} graphs" for c in m["checkpoints"][1::4])
    console.print(f"memory over {m['jobs']} resampled jobs (capacity {m['capacity_per_app']} per app): "
                  f"{m['nbytes_min_after_capacity'] / 1024:.0f}-{m['nbytes_max_after_capacity'] / 1024:.0f} KiB "
                  f"after the first {m['capacity_per_app']} jobs ({points}); decode bound coverage on resampled "
                  f"held-out jobs when full {m['decode_bound_coverage_when_full']}, at the end "
                  f"{m['decode_bound_coverage_end']}")


EVAL_GRAPHS_HELP = (
    "Evaluate compound-job pattern-graph matching against the per-app quantiles on held-out jobs.\n\n"
    "Trains the graph store on a seeded random --train-frac of the jobs (online; its bound calibrated "
    "leave-one-out on the stored jobs) and, for every held-out job at every stage s (stages < s finished, "
    "stage s's prompts known), estimates what remains after s: critical-path decode tokens, total tokens, "
    "stages. Reports per stage the p50 / p90 absolute error of the point estimate (weighted median of the "
    "matches; per-app median for the fallback), the coverage of the bound (calibrated q-quantile; JobProfile "
    "at q), match latency p50 / p99 with 100, 500 and 2,000 stored graphs and memory over a stream of 10x "
    "capacity jobs (resampled from the training jobs where the file has fewer), and what general regressors "
    "on the same attributes predict (is there more to get from them?)."
)


def eval_graphs_command(
    data: Annotated[Path, typer.Option(
        help="Workflows JSON in the deep-research format: [{request_id, stages: [{stage_number, requests: "
             "[{input_tokens, output_tokens}]}]}], optionally an 'app' per job (default: deep_research); "
             "e.g. ../shared/data/agentic/jitserve_deepresearch_training.json.")],
    train_frac: Annotated[float, typer.Option("--train-frac", help="Fraction of the jobs to train on.")] = 0.5,
    seed: Annotated[int, typer.Option(help="Seed of the split and of the resampled jobs.")] = 0,
    quantile: Annotated[float, typer.Option(help="Target coverage q of the bounds, in (0, 1).")] = 0.9,
    capacity: Annotated[int, typer.Option(help="Graphs kept per app before k-medoids consolidation.")] = 500,
    latency_sizes: Annotated[str, typer.Option("--latency-sizes",
                                               help="Stored graphs to time matching with, comma-separated.")
                             ] = "100,500,2000",
    stream_factor: Annotated[int, typer.Option("--stream-factor",
                                               help="Memory run: jobs streamed, in multiples of the capacity.",
                                               min=1)] = 10,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the full report (JSON) here.")] = None,
) -> None:
    """Graph store vs per-app quantiles on held-out jobs (the --help text is EVAL_GRAPHS_HELP)."""
    try:
        sizes = [int(s) for s in latency_sizes.split(",") if s.strip()]
    except ValueError:
        raise TempoError(f"--latency-sizes must be integers separated by commas, got {latency_sizes!r}") from None
    if not sizes or min(sizes) < 1:
        raise TempoError("--latency-sizes needs at least one positive size")
    console = Console()
    with Console(stderr=True).status("evaluating pattern graphs"):
        report = evaluate(data, train_frac, seed, quantile, capacity, sizes, stream_factor)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=2))
    print_report(report, console)
