"""The ``learned`` bound provider: issue #5's length model in the benchmark.

The model (``tempo.models.LengthBoundModel``: text features, LightGBM quantile regression, conformal
calibration, conditional ladders) is fitted on CASTILLO's *fit* and *calibration* prompts of the served
models the benchmark serves, and bounds every latency and deadline request from its prompt text. Compound
calls keep the empirical per-(class, app) ladders: their prompts come from the same deep-research workflows
as the benchmark's, so a text model would have seen them.

The benchmark's prompts must be unseen: build its workload with ``--prompt-split test``. The provider
refuses queries whose prompt text it was trained on.

Fitting one served model takes ~15 s; the artifact is cached under ``.cache/learned/<key>`` (git-ignored),
checksummed like every artifact, and rebuilt when missing or failing verification.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tempo.data.castillo import LengthRow
from tempo.models.artifact import ArtifactError, load_artifact, save_artifact
from tempo.models.dataset import samples_from_rows, split_rows
from tempo.models.length_bounds import LengthBoundModel
from tempo.scheduler.bounds import BoundLadder, BoundProvider, BoundQuery
from tempo.scheduler.slo import SLOClass

from tempo.errors import TempoError

CACHE = Path(".cache/learned")
VERSION = "v1"  # bump when the training recipe changes
TEXT_CLASSES = frozenset({SLOClass.LATENCY, SLOClass.DEADLINE})  # the classes learned bounds serve by default


@dataclass
class LearnedProvider:
    """Learned ladders for requests of ``classes`` with prompt text; ``fallback`` for the others (compound
    calls, text-less requests, and the classes left to it)."""

    model: LengthBoundModel
    fallback: BoundProvider
    seen_prompts: frozenset[str]
    classes: frozenset[SLOClass] = TEXT_CLASSES

    def ladders(self, queries: Sequence[BoundQuery]) -> list[BoundLadder]:
        out = self.fallback.ladders(queries)
        chosen = [i for i, q in enumerate(queries) if q.prompt and q.slo_class in self.classes]
        leaked = sum(1 for i in chosen if queries[i].prompt in self.seen_prompts)
        if leaked:
            raise TempoError(f"{leaked} of the {len(chosen)} prompts to bound were used to train the learned "
                             "estimator: build the workload from unseen prompts (--prompt-split test)")
        for i, ladder in zip(chosen, self.model.ladders([queries[i] for i in chosen]), strict=True):
            out[i] = ladder
        return out


def training_rows(rows: Sequence[LengthRow], models: Sequence[str]) -> dict[str, list[LengthRow]]:
    """The fit and calibration rows of ``models`` (CASTILLO's prompt-hash split; test prompts left out)."""
    parts = split_rows([r for r in rows if r.model in set(models)])
    if not parts["fit"] or not parts["calibration"]:
        raise TempoError(f"the learned estimator has no CASTILLO rows for {sorted(models)}")
    return {"fit": parts["fit"], "calibration": parts["calibration"]}


def fit_learned(rows: Sequence[LengthRow], prompts: dict[str, str], models: Sequence[str], quantile: float,
                seed: int = 0, cache: Path = CACHE) -> tuple[LengthBoundModel, frozenset[str]]:
    """The calibrated model for ``models`` (cached) and the prompt texts it was trained on."""
    parts = training_rows(rows, models)
    seen = frozenset(prompts[r.prompt_id] for rs in parts.values() for r in rs if r.prompt_id in prompts)
    key = hashlib.sha256(json.dumps([sorted(models), quantile, seed, VERSION, len(parts["fit"]),
                                     len(parts["calibration"])]).encode()).hexdigest()[:12]
    directory = cache / f"artifact-{key}"
    try:
        return load_artifact(directory), seen
    except ArtifactError:
        shutil.rmtree(directory, ignore_errors=True)
    model = LengthBoundModel(quantile=quantile, seed=seed)
    model.fit(samples_from_rows(parts["fit"], prompts)).calibrate(samples_from_rows(parts["calibration"], prompts))
    directory.parent.mkdir(parents=True, exist_ok=True)
    save_artifact(model, directory, data_summary={"models": sorted(models), "rows": {k: len(v) for k, v in
                                                                                     parts.items()}})
    return model, seen
