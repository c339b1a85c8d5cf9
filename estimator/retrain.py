"""The retraining job: completions from Redis -> a new batch model -> validated -> published and activated.

The window of completions is split by prompt (a hash of the sketch, so a prompt's repeated completions
stay together) into fit / calibration / held-back slices. The candidate is published (artifact saved,
version registered) and activated only when it is not worse than the active model on the held-back
slice: its coverage is within ``tolerance`` of the target, and either the active model's is not, or
the candidate overestimates less. The previous version stays in the registry for rollback.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tempo.estimator.engine import ServedModel, is_true_length, learned_prompt_tokens, manifest_digest
from tempo.estimator.settings import Settings
from tempo.estimator.store import RETRAIN_GROUP, Store
from tempo.models.artifact import save_artifact
from tempo.models.features import FeatureSpec, RequestInfo, unpack_sketch
from tempo.models.length_bounds import LengthBoundModel, LengthSamples

from tempo.errors import TempoError

log = logging.getLogger("tempo.estimator.retrain")

SLICES = ("fit", "calibration", "holdout")


@dataclass
class RetrainReport:
    status: str  # "activated", "rejected" or "skipped"
    reason: str
    samples: int = 0
    candidate: str | None = None
    previous: str | None = None
    candidate_metrics: dict[str, float] = field(default_factory=dict)
    active_metrics: dict[str, float] = field(default_factory=dict)
    finished_at: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _slice(key: str, fractions: tuple[float, float, float]) -> str:
    u = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    edges = np.cumsum(fractions) / sum(fractions)
    return SLICES[int(np.searchsorted(edges, u, side="right"))]


def samples_from_records(records: list[dict[str, Any]], spec: FeatureSpec,
                         fractions: tuple[float, float, float] = (0.5, 0.25, 0.25)) -> dict[str, LengthSamples]:
    """Completion records as LengthSamples per slice; one request per (prompt sketch, model, app, class)."""
    groups: dict[str, dict[str, Any]] = {s: {"requests": [], "index": [], "lengths": [], "keys": {}} for s in SLICES}
    for record in records:
        sketch_data = record.get("sketch")
        if not isinstance(sketch_data, dict) or not isinstance(record.get("slo_class"), str):
            continue
        try:
            sketch = unpack_sketch(sketch_data, spec)
            prompt_tokens = learned_prompt_tokens(record)
        except (KeyError, TypeError, ValueError):
            continue
        prompt_key = hashlib.sha256(np.asarray(sketch.indices, dtype=np.int64).tobytes()
                                    + f"|{prompt_tokens}|{sketch.n_chars}".encode()).hexdigest()
        part = groups[_slice(prompt_key, fractions)]
        key = f"{prompt_key}|{record.get('model')}|{record.get('app')}|{record['slo_class']}"
        if key not in part["keys"]:
            part["keys"][key] = len(part["requests"])
            part["requests"].append(RequestInfo(prompt_tokens, record.get("app"), record.get("model"),
                                                record["slo_class"], sketch=sketch))
        part["index"].append(part["keys"][key])
        part["lengths"].append(float(record["output_tokens"]))
    return {s: LengthSamples(g["requests"], np.asarray(g["index"], dtype=np.int64), np.asarray(g["lengths"]))
            for s, g in groups.items()}


def evaluate(model: LengthBoundModel, samples: LengthSamples, target: float = 0.9) -> dict[str, float]:
    """Coverage (share of lengths <= B0), overestimation (tokens reserved by B0 per token generated), and
    the overestimation at exactly the target coverage (B0 rescaled by the holdout's own ratio quantile: the
    model's sharpness, what online calibration can get out of it)."""
    b0 = model.predict_bound(samples.requests)[samples.request_index]
    lengths = samples.lengths
    scale = float(np.quantile(lengths / b0, target))
    return {"coverage": round(float(np.mean(lengths <= b0)), 4),
            "overestimation": round(float(b0.sum() / lengths.sum()), 4),
            "overestimation_at_target": round(float(np.ceil(b0 * scale).sum() / lengths.sum()), 4),
            "n": float(len(samples))}


def tolerance_for(target: float, tolerance: float, n_groups: int) -> float:
    """The coverage tolerance: ``tolerance``, widened to two standard errors of a coverage measured on
    ``n_groups`` distinct prompts (a prompt's repeated completions are correlated, so prompts, not
    completions, are the effective sample size)."""
    se = (target * (1 - target) / max(n_groups, 1)) ** 0.5
    return float(max(tolerance, 2 * se))


def accept(candidate: dict[str, float], active: dict[str, float] | None, target: float, tolerance: float) -> str | None:
    """None when the candidate may replace the active model, else why not.

    Not worse = within the coverage band and less overestimation than an in-band active model; when the
    active model is out of the band, a candidate whose coverage is closer to the target is better."""
    cand_gap = max(0.0, target - candidate["coverage"])
    if active is not None and active["coverage"] < target - tolerance:
        active_gap = target - active["coverage"]
        if cand_gap < active_gap:
            return None
        return f"candidate coverage {candidate['coverage']:.3f} is no closer to {target} than the active model's"
    if cand_gap > tolerance:
        return f"candidate coverage {candidate['coverage']:.3f} is below {target - tolerance:.3f}"
    if active is None or candidate["overestimation"] < active["overestimation"]:
        return None
    return (f"candidate overestimates more ({candidate['overestimation']:.3f} >= {active['overestimation']:.3f}) "
            "at acceptable coverage of both")


def retrain(store: Store, settings: Settings, since: str | None = None, min_samples: int = 1000,
            model_params: dict[str, Any] | None = None, tolerance: float = 0.02, activate: bool = True,
            max_records: int = 500_000) -> RetrainReport:
    """Run one retraining job; the report is also stored in Redis (``retrain:last``)."""
    store.ensure_group(RETRAIN_GROUP, start="0")
    # the retrain group is the job's cursor: everything delivered so far was seen by a job
    cursor_entries = store.read_group(RETRAIN_GROUP, "retrain-job", count=max_records, block_ms=None)
    records = _true_records(store.range(start=since or "-", count=max_records))
    report = _retrain(records, store, settings, min_samples, model_params, tolerance, activate)
    report.finished_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    store.set_json("retrain:last", report.to_dict())
    store.ack(RETRAIN_GROUP, [i for i, _ in cursor_entries])
    log.info("retrain %s: %s", report.status, report.reason)
    return report


def _true_records(entries: list[tuple[str, dict[str, Any] | None]]) -> list[dict[str, Any]]:
    """The completion records whose output length is a true length (what a model may learn from)."""
    return [r for _, r in entries if r is not None and isinstance(r.get("output_tokens"), int)
            and r.get("output_tokens", 0) >= 1 and is_true_length(r)]


def judge(candidate: LengthBoundModel, holdout: LengthSamples, store: Store, settings: Settings,
          tolerance: float) -> RetrainReport:
    """The gate every model passes before it is served: the candidate against the active model on held-back
    completions (``accept``). The report's status is "rejected" (with the reason) or "activated"."""
    cand_metrics = evaluate(candidate, holdout, settings.quantile)
    active_version = store.active_version()
    active_metrics = None
    if active_version is not None:
        try:
            served = ServedModel.load(settings.artifacts_dir / active_version)
            active_metrics = evaluate(served.model, holdout, settings.quantile)
        except (OSError, ValueError) as exc:
            log.warning("active model %s cannot be evaluated (%s): treated as absent", active_version, exc)
    band = tolerance_for(settings.quantile, tolerance, len(holdout.requests))
    cand_metrics["tolerance"] = round(band, 4)
    why_not = accept(cand_metrics, active_metrics, settings.quantile, band)
    return RetrainReport("rejected" if why_not else "activated", why_not or "not worse than the active model",
                         0, None, active_version, cand_metrics, active_metrics or {})


def _retrain(records: list[dict[str, Any]], store: Store, settings: Settings, min_samples: int,
             model_params: dict[str, Any] | None, tolerance: float, activate: bool) -> RetrainReport:
    if len(records) < min_samples:
        return RetrainReport("skipped", f"{len(records)} completions, fewer than --min-samples {min_samples}",
                             len(records))
    spec = FeatureSpec()
    parts = samples_from_records(records, spec)
    if min(len(parts[s]) for s in SLICES) < 20:
        return RetrainReport("skipped", "too few completions with prompt sketches in some slice", len(records))
    candidate = LengthBoundModel(quantile=settings.quantile, model_params=dict(model_params or {}))
    candidate.fit(parts["fit"]).calibrate(parts["calibration"], groups_by_app=True)
    report = judge(candidate, parts["holdout"], store, settings, tolerance)
    report.samples = len(records)
    if report.status == "rejected":
        return report
    settings.artifacts_dir.mkdir(parents=True, exist_ok=True)
    staging = settings.artifacts_dir / f".candidate-{time.time_ns()}"
    summary = {"completions": len(records), "models": sorted({str(r.get("model")) for r in records})}
    version = save_artifact(candidate, staging, data_summary=summary, metrics={"holdout": report.candidate_metrics})
    final = settings.artifacts_dir / version
    if final.exists():
        import shutil

        shutil.rmtree(staging)
    else:
        staging.rename(final)
    store.register_version(version, {"digest": manifest_digest(final), "metrics": {"holdout": report.candidate_metrics},
                                     "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    report.candidate = version
    if activate:
        report.previous = store.activate(version)
    else:
        report.status = "published"
    return report


def publish(store: Store, directory: Path, artifacts_dir: Path, activate: bool = True) -> str:
    """Register an existing artifact (copied under ``artifacts_dir/<version>``) and optionally activate it."""
    import shutil

    from tempo.models.artifact import verify_artifact

    manifest = verify_artifact(directory)
    version = str(manifest["version"])
    target = artifacts_dir / version
    if not target.exists():
        artifacts_dir.mkdir(parents=True, exist_ok=True)
        shutil.copytree(directory, target)
    verify_artifact(target)
    store.register_version(version, {"digest": manifest_digest(target), "metrics": manifest.get("metrics", {}),
                                     "created_at": manifest.get("created_at")})
    if activate:
        store.activate(version)
    return version


def periodic(store: Store, settings: Settings, every_s: float, min_samples: int,
             model_params: dict[str, Any] | None = None, stop: Any = None) -> None:
    """Retrain every ``every_s`` seconds (``stop``: an Event to end the loop)."""
    while stop is None or not stop.is_set():
        try:
            retrain(store, settings, min_samples=min_samples, model_params=model_params)
        except TempoError as exc:
            log.warning("retrain skipped: %s", exc)
        if stop is not None:
            stop.wait(every_s)
        else:
            time.sleep(every_s)


def publish_gated(store: Store, settings: Settings, directory: Path, tolerance: float = 0.02,
                  min_holdout: int = 50, max_records: int = 100_000, activate: bool = True) -> RetrainReport:
    """Publish an artifact trained elsewhere through the retraining job's gate (``judge``) on the held-back
    slice of the latest completions: a worse model is refused and not registered. With fewer than
    ``min_holdout`` held-back completions there is nothing to judge by: it is published, and the report
    says so. A tampered artifact fails its checksums (``ArtifactError``) before anything is judged."""
    from tempo.models.artifact import verify_artifact

    version = str(verify_artifact(directory)["version"])
    candidate = ServedModel.load(directory).model
    holdout = samples_from_records(_true_records(store.recent(max_records)), FeatureSpec())["holdout"]
    if version == store.active_version():
        report = RetrainReport("activated", "already the active version", 0, None, version)
    elif len(holdout) >= min_holdout:
        report = judge(candidate, holdout, store, settings, tolerance)
    else:
        report = RetrainReport("activated", f"not judged: {len(holdout)} held-back completions, fewer than "
                               f"{min_holdout}", 0, None, store.active_version())
    report.samples = len(holdout)
    if report.status != "rejected":
        report.candidate = publish(store, directory, settings.artifacts_dir, activate)
        report.status = "activated" if activate else "published"
    report.finished_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    log.info("publish %s: %s", report.status, report.reason)
    return report
