"""Build a mixed-class workload from real data: seeded, reproducible, the same file for every policy.

- latency (chat) and deadline (API / code jobs) requests: CASTILLO prompts with the served model's real
  lengths; each request takes one of the prompt's sampled lengths, so lengths are noisy per prompt;
- compound jobs: deep-research workflows, one line per call, stage s depending on stage s-1;
- best effort: any CASTILLO prompt;
- SLOs scaled by a tier drawn from ``tiers`` (x1..x4 by default), so not every request is equally urgent;
- arrivals: Poisson, or any trace in the Azure CSV format rescaled to the target rate.

The class mix is over *arrivals*: a compound job is one arrival however many calls it has.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tempo.data.castillo import SPLITS, LengthRow, load_length_rows, load_prompts, prompt_split
from tempo.scheduler.slo import (
    DEFAULT_DEADLINE_S,
    DEFAULT_STAGE_DEADLINE_S,
    DEFAULT_TBT_S,
    DEFAULT_TTFT_S,
    SLOClass,
)
from tempo.serving.workloads.format import WorkloadRequest
from tempo.serving.workloads.sources import (
    Workflow,
    load_arrival_trace,
    load_workflows,
    poisson_arrivals,
    trace_arrivals,
)

from tempo.errors import TempoError

DEFAULT_MODEL = "meta-llama--Llama-3.1-8B-Instruct"
CHAT_DATASETS = ("Alpaca", "DollyDataset", "ShareGPT")
CODE_DATASETS = ("Apps", "BigCodeBench", "DS1000", "Mbpp")
COMPOUND_APP = "deep_research"
MIX_ORDER = (SLOClass.LATENCY, SLOClass.DEADLINE, SLOClass.COMPOUND, SLOClass.BEST_EFFORT)


@dataclass(frozen=True)
class ClassMix:
    """Relative arrival weights per class (need not sum to 1)."""

    weights: dict[SLOClass, float]

    @classmethod
    def parse(cls, text: str) -> ClassMix:
        """``L:D:C[:B]`` (positional) or ``latency=1,deadline=2,...`` (named; others 0)."""
        text = text.strip()
        weights: dict[SLOClass, float] = dict.fromkeys(MIX_ORDER, 0.0)
        try:
            if "=" in text:
                for part in filter(None, (p.strip() for p in re.split(r"[,;]", text))):
                    name, _, value = part.partition("=")
                    weights[SLOClass.parse(name)] = float(value)
            else:
                values = [float(v) for v in text.split(":")]
                if not 3 <= len(values) <= 4:
                    raise ValueError("expected L:D:C or L:D:C:B")
                weights.update(zip(MIX_ORDER, values, strict=False))
        except ValueError as exc:
            raise TempoError(f"bad --mix {text!r}: {exc}") from None
        if any(not np.isfinite(w) or w < 0 for w in weights.values()):
            raise TempoError(f"bad --mix {text!r}: weights must be finite and >= 0")
        if sum(weights.values()) <= 0:
            raise TempoError(f"bad --mix {text!r}: weights sum to 0")
        return cls(weights)

    def shares(self) -> dict[SLOClass, float]:
        total = sum(self.weights.values())
        return {c: w / total for c, w in self.weights.items()}

    def counts(self, total: int) -> dict[SLOClass, int]:
        """Split ``total`` arrivals by weight, largest remainder first, so the mix is exact."""
        exact = {c: s * total for c, s in self.shares().items()}
        counts = {c: int(np.floor(v)) for c, v in exact.items()}
        by_remainder = sorted(exact, key=lambda c: (exact[c] - counts[c], -MIX_ORDER.index(c)), reverse=True)
        for c in by_remainder[: total - sum(counts.values())]:
            counts[c] += 1
        return counts


@dataclass(frozen=True)
class WorkloadSpec:
    """Everything that determines a workload; the same spec and seed give the same file."""

    rps: float
    duration_s: float
    mix: ClassMix = field(default_factory=lambda: ClassMix.parse("1:1:1:0"))
    arrivals: str = "poisson"  # "poisson" or the path of an Azure-format CSV trace
    seed: int = 0
    model: str = DEFAULT_MODEL
    tiers: tuple[int, ...] = (1, 2, 3, 4)
    latency_datasets: tuple[str, ...] = CHAT_DATASETS
    deadline_datasets: tuple[str, ...] = CODE_DATASETS
    ttft_s: float = DEFAULT_TTFT_S
    tbt_s: float = DEFAULT_TBT_S
    deadline_s: float = DEFAULT_DEADLINE_S
    stage_deadline_s: float = DEFAULT_STAGE_DEADLINE_S
    # draw prompts only from this hash split of CASTILLO ("test": prompts no length model trained on)
    prompt_split: str | None = None

    def validate(self) -> None:
        if not (np.isfinite(self.rps) and self.rps > 0):
            raise TempoError(f"--rps must be > 0, got {self.rps}")
        if not (np.isfinite(self.duration_s) and self.duration_s > 0):
            raise TempoError(f"--duration must be > 0, got {self.duration_s}")
        if not self.tiers or any(t < 1 for t in self.tiers):
            raise TempoError(f"SLO tiers must be integers >= 1, got {self.tiers}")
        if self.prompt_split is not None and self.prompt_split not in SPLITS:
            raise TempoError(f"--prompt-split must be one of {', '.join(SPLITS)}, got {self.prompt_split!r}")
        if self.arrivals != "poisson" and not Path(self.arrivals).is_file():
            raise TempoError(f"--arrivals: trace file not found: {self.arrivals}")


class _LengthPool:
    """CASTILLO rows of one served model, drawn per class from the datasets that class uses."""

    def __init__(
        self, rows: Sequence[LengthRow], model: str, prompts: dict[str, str], split: str | None = None
    ) -> None:
        models = sorted({r.model for r in rows})
        if model not in models:
            raise TempoError(f"unknown served model {model!r} (known: {', '.join(models)})")
        self.prompts = prompts
        self.by_dataset: dict[str, list[LengthRow]] = defaultdict(list)
        for row in rows:
            in_split = split is None or prompt_split(row.prompt_id) == split
            if row.model == model and row.prompt_id in prompts and in_split:
                self.by_dataset[row.dataset].append(row)

    def rows_for(self, datasets: Sequence[str] | None) -> list[LengthRow]:
        names = sorted(self.by_dataset) if datasets is None else list(datasets)
        chosen = [r for d in names for r in self.by_dataset.get(d, [])]
        if not chosen:
            raise TempoError(f"no CASTILLO rows for datasets {names} (have: {sorted(self.by_dataset)})")
        return chosen


def build_arrivals(spec: WorkloadSpec, rng: np.random.Generator) -> np.ndarray:
    if spec.arrivals == "poisson":
        return poisson_arrivals(spec.rps, spec.duration_s, rng)
    return trace_arrivals(load_arrival_trace(Path(spec.arrivals)), spec.rps, spec.duration_s, rng)


def build_workload(
    spec: WorkloadSpec,
    *,
    length_rows: Sequence[LengthRow] | None = None,
    prompts: dict[str, str] | None = None,
    workflows: Sequence[Workflow] | None = None,
) -> list[WorkloadRequest]:
    """The workload of ``spec``, requests ordered by arrival (compound calls by job, stage)."""
    spec.validate()
    rng = np.random.default_rng(spec.seed)
    arrivals = build_arrivals(spec, rng)
    counts = spec.mix.counts(len(arrivals))
    classes = rng.permutation(np.array([c for c in MIX_ORDER for _ in range(counts[c])], dtype=object))

    needs_text = any(counts[c] for c in MIX_ORDER if c is not SLOClass.COMPOUND)
    pool = (
        _LengthPool(length_rows or load_length_rows(), spec.model, prompts or load_prompts(), spec.prompt_split)
        if needs_text
        else None
    )
    datasets = {
        SLOClass.LATENCY: spec.latency_datasets,
        SLOClass.DEADLINE: spec.deadline_datasets,
        SLOClass.BEST_EFFORT: None,
    }
    candidates = {c: pool.rows_for(datasets[c]) for c in datasets if counts[c] and pool is not None}
    flows = list(workflows or load_workflows()) if counts[SLOClass.COMPOUND] else []

    requests: list[WorkloadRequest] = []
    for index, (arrival, cls) in enumerate(zip(arrivals, classes, strict=True)):
        tier = int(rng.choice(spec.tiers))
        arrival = round(float(arrival), 6)
        if cls is SLOClass.COMPOUND:
            flow = flows[int(rng.integers(len(flows)))]
            requests.extend(_compound_calls(f"j{index:06d}", flow, arrival, tier, spec))
            continue
        assert pool is not None
        rows = candidates[cls]
        row = rows[int(rng.integers(len(rows)))]
        slo_fields: dict[str, float] = {}
        if cls is SLOClass.LATENCY:
            slo_fields = {"ttft_slo_s": spec.ttft_s * tier, "tbt_slo_s": spec.tbt_s * tier}
        elif cls is SLOClass.DEADLINE:
            slo_fields = {"deadline_s": spec.deadline_s * tier}
        requests.append(
            WorkloadRequest(
                id=f"r{index:06d}",
                arrival_s=arrival,
                slo_class=cls,
                slo_tier=tier if cls is not SLOClass.BEST_EFFORT else 1,
                prompt=pool.prompts[row.prompt_id],
                prompt_tokens=row.input_tokens,
                output_tokens=int(row.samples[int(rng.integers(len(row.samples)))]),
                model=spec.model,
                app=f"chat/{row.dataset}" if row.dataset in CHAT_DATASETS else f"code/{row.dataset}",
                source=f"castillo:{row.dataset}:{row.prompt_id}",
                **slo_fields,
            )
        )
    return requests


def _compound_calls(
    job_id: str, flow: Workflow, arrival: float, tier: int, spec: WorkloadSpec
) -> list[WorkloadRequest]:
    job_deadline = spec.stage_deadline_s * len(flow.stages) * tier
    calls: list[WorkloadRequest] = []
    previous: list[str] = []
    for stage, stage_calls in enumerate(flow.stages):
        ids = [f"{job_id}.{stage}.{k}" for k in range(len(stage_calls))]
        for call_id, call in zip(ids, stage_calls, strict=True):
            calls.append(
                WorkloadRequest(
                    id=call_id,
                    arrival_s=arrival,
                    slo_class=SLOClass.COMPOUND,
                    job_deadline_s=job_deadline,
                    slo_tier=tier,
                    prompt_tokens=call.input_tokens,
                    output_tokens=call.output_tokens,
                    app=COMPOUND_APP,
                    job_id=job_id,
                    stage=stage,
                    depends_on=list(previous),
                    source=f"deep_research:{flow.workflow_id}",
                )
            )
        previous = ids
    return calls
