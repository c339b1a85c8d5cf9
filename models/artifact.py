"""Versioned model artifacts: a directory with a JSON manifest and checksummed files.

- ``manifest.json``: format, version (a content hash), quantile, model kind, feature spec, ladder and
  calibration parameters, data summary, metrics, library versions and the sha256 of every other file.
- ``svd_components.npy``, ``text_score.npy``: numpy arrays, loaded with ``allow_pickle=False``.
- the quantile model: LightGBM native text, or skops with an explicit trusted-type list. Never pickle.

Loading verifies every checksum before reading a file, so a tampered or truncated artifact is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from tempo.models.features import FeatureSpec, Featurizer
from tempo.models.length_bounds import LadderCalibration, LengthBoundModel
from tempo.models.quantile import MODEL_KINDS
from tempo.models.text_score import TextScore

FORMAT = "tempo-length-model/1"
MANIFEST = "manifest.json"


class ArtifactError(ValueError):
    """The artifact is missing, malformed or fails its checksums."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _library_versions() -> dict[str, str]:
    out = {}
    for name in ("numpy", "scikit-learn", "lightgbm", "quantile-forest", "skops"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def save_artifact(
    model: LengthBoundModel,
    directory: Path,
    data_summary: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> str:
    """Write the fitted, calibrated model to ``directory`` (created; must not exist or be empty).

    Writes into a temporary sibling and renames it into place, so a reader never sees half an artifact.
    Returns the version: the first 16 hex digits of the sha256 of the files' checksums and parameters.
    """
    featurizer, calibration = model.featurizer_, model.calibration_
    if featurizer is None or featurizer.components_ is None or featurizer.text_score_ is None or model.model_ is None:
        raise ArtifactError("only a fitted model can be saved")
    if calibration is None:
        raise ArtifactError("calibrate the model before saving it")
    if directory.exists() and any(directory.iterdir()):
        raise ArtifactError(f"{directory} exists and is not empty")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=directory.parent))
    try:
        np.save(staging / "svd_components.npy", featurizer.components_, allow_pickle=False)
        score = featurizer.text_score_
        assert score.coef_ is not None
        np.save(staging / "text_score.npy", np.append(score.coef_, score.intercept_), allow_pickle=False)
        files = ["svd_components.npy", "text_score.npy", *model.model_.save(staging)]
        checksums = {name: sha256_file(staging / name) for name in files}
        params = {
            "quantile": model.quantile,
            "kind": model.kind,
            "feature_spec": model.spec.to_dict(),
            "fractions": list(model.fractions),
            "k_draws": model.k_draws,
            "k_max": model.k_max,
            "coverage_margin": model.coverage_margin,
            "min_survivors": model.min_survivors,
            "seed": model.seed,
            "model_params": model.model_params,
            "text_score_alpha": score.alpha,
            "calibration": calibration.to_dict(),
        }
        version = hashlib.sha256(json.dumps([checksums, params], sort_keys=True).encode()).hexdigest()[:16]
        manifest = {
            "format": FORMAT,
            "version": version,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **params,
            "data_summary": data_summary or {},
            "metrics": metrics or {},
            "libraries": _library_versions(),
            "files": checksums,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        if directory.exists():
            directory.rmdir()
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return version


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{directory}: no {MANIFEST}")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path}: not JSON: {exc.msg}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not a {FORMAT} manifest")
    return manifest


def verify_artifact(directory: Path) -> dict[str, Any]:
    """The manifest, after checking the sha256 of every file it lists (and that the version matches)."""
    manifest = read_manifest(directory)
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ArtifactError(f"{directory}: manifest lists no files")
    for name, expected in files.items():
        path = directory / name
        if Path(name).name != name or not path.is_file():
            raise ArtifactError(f"{directory}: missing or invalid file {name!r}")
        if sha256_file(path) != expected:
            raise ArtifactError(f"{directory}: checksum mismatch for {name} (tampered or corrupt)")
    params = {k: manifest[k] for k in (
        "quantile", "kind", "feature_spec", "fractions", "k_draws", "k_max", "coverage_margin",
        "min_survivors", "seed", "model_params", "text_score_alpha", "calibration")}
    version = hashlib.sha256(json.dumps([files, params], sort_keys=True).encode()).hexdigest()[:16]
    if version != manifest.get("version"):
        raise ArtifactError(f"{directory}: manifest parameters do not match its version (tampered)")
    return manifest


def load_artifact(directory: Path) -> LengthBoundModel:
    """The model saved in ``directory``; ArtifactError when anything fails verification."""
    manifest = verify_artifact(directory)
    kind = manifest["kind"]
    if kind not in MODEL_KINDS:
        raise ArtifactError(f"{directory}: unknown model kind {kind!r}")
    spec = FeatureSpec.from_dict(manifest["feature_spec"])
    components = np.load(directory / "svd_components.npy", allow_pickle=False)
    score_vector = np.load(directory / "text_score.npy", allow_pickle=False)
    if components.shape != (spec.n_hash, spec.svd_dims):
        raise ArtifactError(f"{directory}: svd_components shape {components.shape} disagrees with the spec")
    score = TextScore(alpha=manifest["text_score_alpha"], coef_=score_vector[:-1], intercept_=float(score_vector[-1]))
    model = LengthBoundModel(
        quantile=manifest["quantile"],
        kind=kind,
        spec=spec,
        fractions=tuple(manifest["fractions"]),
        k_draws=manifest["k_draws"],
        k_max=manifest["k_max"],
        coverage_margin=manifest["coverage_margin"],
        min_survivors=manifest["min_survivors"],
        seed=manifest["seed"],
        model_params=manifest["model_params"],
    )
    model.featurizer_ = Featurizer(spec, components_=components, text_score_=score)
    model.model_ = MODEL_KINDS[kind].load(directory, manifest["quantile"])
    model.calibration_ = LadderCalibration.from_dict(manifest["calibration"])
    return model


def artifact_size_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file())


__all__ = ["ArtifactError", "load_artifact", "read_manifest", "save_artifact", "verify_artifact"]
