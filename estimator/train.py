"""Bootstrap the service's batch model from a CASTILLO-format dataset: ``tempo estimator train``.

Without it an artifact comes only from Python code or from completions already in Redis (``retrain``), so a
fresh deployment has nothing to publish. Rows are split by a hash of the prompt id into fit / calibration /
held-back test (60/20/20, the split ``tempo estimator eval`` uses; a prompt's samples and its rows for every
served model stay in one split, so nothing leaks), the model is fitted and conformally calibrated, and its
bound is measured on the held-back prompts; those figures go into the artifact's manifest, which
``tempo estimator publish`` registers with the version.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tempo.data.castillo import SPLITS, LengthRow, load_length_rows, load_prompts
from tempo.models.artifact import ArtifactError, save_artifact, sha256_file
from tempo.models.dataset import samples_from_rows, split_rows
from tempo.models.evaluation import bound_metrics, ladder_metrics
from tempo.models.length_bounds import LengthBoundModel, LengthSamples

from tempo.errors import TempoError

MIN_PROMPTS = 10  # distinct prompts each split needs: fewer gives a calibration and a coverage that are noise
SPLIT = "sha256(prompt_id): fit/calibration/test 60/20/20"
DEFAULT_N_ESTIMATORS = 300  # LightGBMQuantile's default, what the service's artifacts are measured with


@dataclass
class TrainReport:
    """What was trained on what, and how its bound did on the held-back prompts (also in the manifest)."""

    version: str
    path: str
    quantile: float
    models: list[str]
    datasets: list[str]
    rows: dict[str, int]  # per split
    prompts: dict[str, int]  # distinct prompts per split
    samples: dict[str, int]  # sampled lengths per split
    holdout: dict[str, Any]  # coverage (pooled, per dataset, per model), reserved per used token, ladder
    config: dict[str, Any]
    elapsed_s: float  # reading, training, measuring and writing
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_out_dir(out: Path) -> None:
    """Refuse before training, not after: an artifact directory is never overwritten."""
    if out.exists() and not out.is_dir():
        raise TempoError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        raise TempoError(f"--out {out} exists and is not empty (artifacts are never overwritten: choose a new one)")


def select_models(rows: Sequence[LengthRow], models: str | Sequence[str] | None, data: Path) -> list[str]:
    """The served models to train on: every model in the file for None / 'all', else the named ones."""
    present = sorted({r.model for r in rows})
    if models is None or (isinstance(models, str) and models.strip() in ("", "all")):
        return present
    names = [m.strip() for m in models.split(",")] if isinstance(models, str) else [m.strip() for m in models]
    chosen = list(dict.fromkeys(m for m in names if m))
    missing = [m for m in chosen if m not in present]
    if not chosen:
        raise TempoError(f"--models: no model named in {models!r} (present: {', '.join(present)}, or 'all')")
    if missing:
        raise TempoError(f"--models: {', '.join(missing)} not in {data} (present: {', '.join(present)})")
    return chosen


def _split(rows: Sequence[LengthRow], target: float, min_prompts: int) -> dict[str, list[LengthRow]]:
    """Rows per split; TempoError when a split is too small to fit, calibrate to ``target`` or measure."""
    parts: dict[str, list[LengthRow]] = split_rows(rows)
    counts = {s: len({r.prompt_id for r in parts[s]}) for s in SPLITS}
    if min(counts.values()) < min_prompts:
        total = len({r.prompt_id for r in rows})
        raise TempoError(
            f"too few prompts to split: {total} distinct prompts gave "
            f"{', '.join(f'{s} {n}' for s, n in counts.items())}; each split needs at least {min_prompts} "
            f"(the split is 60/20/20 by prompt hash, so about {math.ceil(min_prompts / 0.2 * 1.5)} prompts or more)")
    # split-conformal needs n >= q / (1 - q) scores for a finite ceil((n+1)q)-th one
    needed = math.ceil(target / (1 - target) - 1e-9)
    n_cal = sum(len(r.samples) for r in parts["calibration"])
    if n_cal < needed:
        raise TempoError(f"the calibration split has {n_cal} sampled lengths; calibrating to {target:g} (the "
                         f"quantile plus the model's coverage margin) needs at least {needed}: more prompts, or a "
                         "lower --quantile")
    return parts


def _holdout_metrics(model: LengthBoundModel, test: LengthSamples, quantile: float, n_prompts: int) -> dict[str, Any]:
    """The B0 bound on the held-back prompts: coverage pooled / per dataset / per served model, and the
    tokens it reserves per token generated (sum of bounds over sum of lengths: what a scheduler pays)."""
    bound = model.predict_bound(test.requests)[test.request_index]
    metrics: dict[str, Any] = bound_metrics(test.lengths, bound, test.sample_apps, quantile)
    metrics["prompts"] = n_prompts
    metrics["target"] = quantile
    # coverage is measured on prompts (a prompt's samples are correlated): two standard errors of it
    metrics["coverage_2se"] = round(2 * math.sqrt(quantile * (1 - quantile) / max(n_prompts, 1)), 4)
    metrics["overestimation"] = metrics["reserved_per_used"]  # the name `tempo estimator retrain` records
    models = np.asarray([test.requests[i].model or "-" for i in test.request_index])
    if len(set(models.tolist())) > 1:
        covered = test.lengths <= bound
        metrics["coverage_by_model"] = {
            str(m): {"coverage": round(float(covered[models == m].mean()), 4), "samples": int((models == m).sum()),
                     "reserved_per_used": round(float(bound[models == m].sum() / test.lengths[models == m].sum()), 4)}
            for m in np.unique(models)}
    metrics["ladder"] = ladder_metrics(model, test)
    return metrics


def train(data: Path, prompts: Path, out: Path, models: str | Sequence[str] | None = None, quantile: float = 0.9,
          n_estimators: int = DEFAULT_N_ESTIMATORS, seed: int = 0, min_prompts: int = MIN_PROMPTS,
          on_stage: Callable[[str], None] | None = None) -> TrainReport:
    """Train, calibrate and measure a length-bound model on ``data`` and save it as an artifact in ``out``.

    ``on_stage`` is told what is happening (for a progress display). User errors raise TempoError.
    """
    stage = on_stage or (lambda _: None)
    if not 0 < quantile < 1:
        raise TempoError(f"--quantile must be in (0, 1), got {quantile}")
    if n_estimators < 1:
        raise TempoError(f"--n-estimators must be at least 1, got {n_estimators}")
    check_out_dir(out)
    start = time.perf_counter()
    stage(f"reading {data}")
    all_rows = load_length_rows(data)
    stage(f"reading {prompts}")
    texts = load_prompts(prompts)
    chosen = select_models(all_rows, models, data)
    wanted = set(chosen)
    rows = [r for r in all_rows if r.model in wanted]
    model = LengthBoundModel(quantile=quantile, seed=seed, model_params={"n_estimators": n_estimators, "seed": seed})
    parts = _split(rows, min(quantile + model.coverage_margin, 0.999), min_prompts)  # the calibration target
    warnings: list[str] = []
    without_text = sum(r.prompt_id not in texts for r in rows)
    if without_text == len(rows):
        raise TempoError(f"no prompt id of {data} is in {prompts} (is it the matching prompts file?)")
    if without_text:
        warnings.append(f"{without_text} of {len(rows)} rows have no prompt text in {prompts}: "
                        "they train on the prompt length and metadata only")
    fit, cal, test = (samples_from_rows(parts[s], texts) for s in SPLITS)
    stage(f"fitting on {len(parts['fit'])} rows ({len(fit)} sampled lengths)")
    model.fit(fit)
    stage(f"calibrating on {len(parts['calibration'])} rows")
    model.calibrate(cal)
    stage(f"measuring on {len(parts['test'])} held-back rows")
    prompts_per = {s: len({r.prompt_id for r in parts[s]}) for s in SPLITS}
    holdout = _holdout_metrics(model, test, quantile, prompts_per["test"])
    rows_per = {s: len(parts[s]) for s in SPLITS}
    samples_per = {"fit": len(fit), "calibration": len(cal), "test": len(test)}
    datasets = sorted({r.dataset for r in rows})
    config = {"data": str(data), "prompts": str(prompts), "data_sha256": sha256_file(data),
              "prompts_sha256": sha256_file(prompts), "split": SPLIT, "quantile": quantile,
              "n_estimators": n_estimators, "seed": seed, "kind": model.kind}
    summary = {"source": "tempo estimator train", **config, "models": chosen, "datasets": datasets,
               "rows": rows_per, "prompts_per_split": prompts_per, "samples": samples_per}
    stage(f"writing {out}")
    try:
        version = save_artifact(model, out, data_summary=summary, metrics={"holdout": holdout})
    except ArtifactError as exc:  # e.g. --out filled up while we trained
        raise TempoError(str(exc)) from None
    return TrainReport(version, str(out), quantile, chosen, datasets, rows_per, prompts_per, samples_per, holdout,
                       config, round(time.perf_counter() - start, 1), warnings)
