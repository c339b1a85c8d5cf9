"""Bound providers the benchmark can plug into the scheduler, by name, and what they are fitted on.

- ``empirical``: needs no text model. Per (class, app) it takes the empirical q-quantile of response
  lengths and a conditional ladder: the q-quantile of L given L > k at k = 0, 0.25 B0, 0.5 B0, 0.7 B0, B0,
  then at each new bound while enough samples remain above it. Unknown (class, app) pairs fall back to the
  class, then to all classes. Fitted on a *training* set of completions disjoint from the benchmark
  workload (see ``training_workload``).
- ``fixed``: one bound for everything, never tightening (the "no estimator" ablation): the training
  set's q-quantile over all classes.
- ``oracle``: the true length as a one-step ladder (analysis only; the oracle *policy* gets the truth
  separately, and the benchmark never hands this provider to a non-oracle policy by default).

- ``learned``: issue #5's length model from prompt text (``tempo.serving.bounds.learned``), trained on CASTILLO's fit
  and calibration prompts of the workload's served models; compound calls keep the empirical ladders.
  Needs a workload of unseen prompts (``--prompt-split test``). ``learned-deadline``: the same for
  deadline requests only, chat on the empirical ladders.

Another estimator plugs in with one line::

    register_provider("mine", lambda ctx: MyEstimatorProvider.load(...))

where the object has ``ladders(queries) -> list[BoundLadder]`` (``tempo.scheduler.bounds.BoundProvider``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

import numpy as np
from tempo.data.castillo import LengthRow, load_length_rows, load_prompts
from tempo.models.job_graphs import GraphStore
from tempo.scheduler.bounds import BoundLadder, BoundProvider, BoundQuery
from tempo.scheduler.jobs import JobGraph, JobProfile
from tempo.scheduler.slo import SLOClass
from tempo.serving.workloads.builder import WorkloadSpec, build_workload
from tempo.serving.workloads.format import WorkloadRequest
from tempo.serving.workloads.sources import Workflow, load_workflows, split_workflows

from tempo.errors import TempoError

LADDER_FRACTIONS = (0.25, 0.5, 0.7, 1.0)
TRAINING_SEED_OFFSET = 1_000_003


def conditional_ladder(
    lengths: Sequence[int], quantile: float, min_tail: int = 20, max_steps: int = 12
) -> BoundLadder:
    """The ladder of q-quantiles of L given L > k (see the module doc) from sample lengths."""
    xs = np.sort(np.asarray(lengths, dtype=np.int64))
    if len(xs) == 0:
        raise ValueError("no lengths to fit a ladder on")

    def q_of(tail: np.ndarray) -> int:
        index = min(len(tail) - 1, max(0, int(np.ceil(quantile * len(tail))) - 1))
        return int(tail[index])

    b0 = max(1, q_of(xs))
    ks = sorted({0, *(int(f * b0) for f in LADDER_FRACTIONS)})
    steps: list[tuple[int, int]] = []
    previous = 0

    def add(k: int) -> bool:
        nonlocal previous
        tail = xs[xs > k]
        if len(tail) < (1 if k == 0 else min_tail):
            return False
        bound = max(q_of(tail), previous, k + 1)
        if steps and k <= steps[-1][0]:
            return True
        steps.append((k, bound))
        previous = bound
        return True

    for k in ks:
        if not add(k):
            break
    else:
        while len(steps) < max_steps and add(steps[-1][1]):
            pass
    return BoundLadder(tuple(steps), quantile=quantile)


@dataclass
class EmpiricalProvider:
    """Per-(class, app) conditional ladders from past completions."""

    quantile: float = 0.9
    min_samples: int = 30
    ladders_: dict[tuple[str, str], BoundLadder] = field(default_factory=dict)
    class_ladders_: dict[str, BoundLadder] = field(default_factory=dict)
    global_ladder_: BoundLadder | None = None

    def fit(self, completions: Iterable[tuple[SLOClass, str, int]]) -> EmpiricalProvider:
        """From ``(class, app, output_tokens)`` of finished requests."""
        by_key: dict[tuple[str, str], list[int]] = defaultdict(list)
        by_class: dict[str, list[int]] = defaultdict(list)
        everything: list[int] = []
        for cls, app, tokens in completions:
            by_key[(cls.value, app)].append(int(tokens))
            by_class[cls.value].append(int(tokens))
            everything.append(int(tokens))
        if not everything:
            raise TempoError("the empirical bound provider needs at least one training completion")
        self.ladders_ = {
            k: conditional_ladder(v, self.quantile) for k, v in by_key.items() if len(v) >= self.min_samples
        }
        self.class_ladders_ = {
            k: conditional_ladder(v, self.quantile) for k, v in by_class.items() if len(v) >= self.min_samples
        }
        self.global_ladder_ = conditional_ladder(everything, self.quantile)
        return self

    def ladder_for(self, slo_class: SLOClass, app: str) -> BoundLadder:
        if self.global_ladder_ is None:
            raise RuntimeError("EmpiricalProvider is not fitted")
        found = self.ladders_.get((slo_class.value, app)) or self.class_ladders_.get(slo_class.value)
        return found or BoundLadder(self.global_ladder_.steps, self.quantile, fallback=True)

    def ladders(self, queries: Sequence[BoundQuery]) -> list[BoundLadder]:
        return [self.ladder_for(q.slo_class, q.app) for q in queries]


@dataclass(frozen=True)
class FixedProvider:
    bound: int
    quantile: float = 0.9

    def ladders(self, queries: Sequence[BoundQuery]) -> list[BoundLadder]:
        ladder = BoundLadder.fixed(self.bound, self.quantile)
        return [ladder] * len(queries)


@dataclass(frozen=True)
class OracleProvider:
    lengths: Mapping[str, int]

    def ladders(self, queries: Sequence[BoundQuery]) -> list[BoundLadder]:
        return [BoundLadder.fixed(self.lengths[q.request_id], quantile=1.0) for q in queries]


# ----------------------------------------------------------------- registry
@dataclass(frozen=True)
class ProviderContext:
    """What a provider factory may use: the training completions (disjoint from the benchmark workload),
    the quantile, and, for the oracle provider only, the truth."""

    training: Sequence[WorkloadRequest]
    quantile: float = 0.9
    truth: Mapping[str, int] | None = None


ProviderFactory = Callable[[ProviderContext], BoundProvider]
_PROVIDERS: dict[str, ProviderFactory] = {}


def register_provider(name: str, factory: ProviderFactory) -> None:
    if name in _PROVIDERS:
        raise ValueError(f"bound provider {name!r} is already registered")
    _PROVIDERS[name] = factory


def provider_names() -> list[str]:
    return list(_PROVIDERS)


def make_provider(name: str, context: ProviderContext) -> BoundProvider:
    if name not in _PROVIDERS:
        raise TempoError(f"unknown estimator {name!r} (known: {', '.join(_PROVIDERS)})")
    return _PROVIDERS[name](context)


def _completions(training: Iterable[WorkloadRequest]) -> list[tuple[SLOClass, str, int]]:
    return [(w.slo_class, w.app, w.output_tokens) for w in training]


def _empirical(ctx: ProviderContext) -> BoundProvider:
    return EmpiricalProvider(quantile=ctx.quantile).fit(_completions(ctx.training))


def _fixed(ctx: ProviderContext) -> BoundProvider:
    lengths = [w.output_tokens for w in ctx.training]
    if not lengths:
        raise TempoError("the fixed bound provider needs training completions")
    return FixedProvider(int(np.quantile(lengths, ctx.quantile, method="inverted_cdf")), ctx.quantile)


def _oracle(ctx: ProviderContext) -> BoundProvider:
    if ctx.truth is None:
        raise TempoError("the oracle estimator needs the true lengths")
    return OracleProvider(ctx.truth)


def _learned(ctx: ProviderContext, classes: frozenset[SLOClass] | None = None) -> BoundProvider:
    from tempo.serving.bounds.learned import TEXT_CLASSES, LearnedProvider, fit_learned

    models = sorted({w.model for w in ctx.training if w.model})
    if not models:
        raise TempoError("the learned estimator needs training completions that name their served model")
    rows, prompts, _ = _sources()
    model, seen = fit_learned(rows, prompts, models, ctx.quantile)
    return LearnedProvider(model, _empirical(ctx), seen, classes or TEXT_CLASSES)


def _learned_deadline(ctx: ProviderContext) -> BoundProvider:
    """Learned bounds for deadline requests only, chat on the per-app ladders (docs/scheduler.md: a chat
    request needs a pace, not a length)."""
    return _learned(ctx, frozenset({SLOClass.DEADLINE}))


register_provider("empirical", _empirical)
register_provider("fixed", _fixed)
register_provider("oracle", _oracle)
register_provider("learned", _learned)
register_provider("learned-deadline", _learned_deadline)


# ------------------------------------------------------------ training data
@lru_cache(maxsize=1)
def _sources() -> tuple[tuple[LengthRow, ...], dict[str, str], tuple[Workflow, ...]]:
    return tuple(load_length_rows()), load_prompts(), tuple(load_workflows())


def build_cached(spec: WorkloadSpec, part: str = "serve") -> list[WorkloadRequest]:
    """``build_workload`` with the vendored data read once per process (the benchmark builds many).
    Compound jobs come from one half of the workflows: ``part="serve"`` for benchmarks, ``"train"`` for the
    past jobs policies learn from (``split_workflows``)."""
    rows, prompts, workflows = _sources()
    train, serve = split_workflows(workflows)
    if part not in ("serve", "train"):
        raise ValueError(f"part must be 'serve' or 'train', got {part!r}")
    return build_workload(spec, length_rows=rows, prompts=prompts, workflows=serve if part == "serve" else train)


def training_workload(
    spec: WorkloadSpec, benchmark: Sequence[WorkloadRequest], size: int = 6000
) -> list[WorkloadRequest]:
    """Completions to fit providers on: a workload of the same mix built with a different seed, minus every
    request whose prompt (CASTILLO prompt id) or workflow also occurs in the benchmark workload.

    Compound jobs come from the other half of the workflows (``build_cached(part="train")``), so that graph
    matching never meets a job it has stored; a workload file's own workflows are dropped as well.
    """
    rate = max(1.0, size / spec.duration_s)
    train_spec = replace(spec, rps=rate, arrivals="poisson", seed=spec.seed + TRAINING_SEED_OFFSET)
    used = {w.source for w in benchmark if w.source}
    return [w for w in build_cached(train_spec, part="train") if w.source not in used]


def job_graphs(requests: Iterable[WorkloadRequest]) -> list[tuple[str, JobGraph]]:
    """``(app, stages of (prompt, output))`` of every compound job in ``requests``."""
    jobs: dict[str, dict[int, list[tuple[int, int]]]] = defaultdict(lambda: defaultdict(list))
    apps: dict[str, str] = {}
    for w in requests:
        if w.job_id is None:
            continue
        jobs[w.job_id][w.stage or 0].append((w.prompt_tokens, w.output_tokens))
        apps[w.job_id] = w.app
    return [(apps[j], [stages[s] for s in sorted(stages)]) for j, stages in jobs.items()]


def fit_job_profile(training: Iterable[WorkloadRequest], quantile: float = 0.9) -> JobProfile:
    return JobProfile.fit(job_graphs(training), quantile)


def fit_job_graphs(training: Iterable[WorkloadRequest], quantile: float = 0.9) -> GraphStore:
    """The pattern-graph store of the training workload's compound jobs (what graph matching starts from)."""
    return GraphStore(quantile=quantile).extend(job_graphs(training))


def queries_for(workload: Iterable[WorkloadRequest]) -> list[BoundQuery]:
    return [
        BoundQuery(
            request_id=w.id,
            prompt_tokens=w.prompt_tokens,
            slo_class=w.slo_class,
            app=w.app,
            model=w.model,
            prompt=w.prompt,
        )
        for w in workload
    ]


def describe_provider(provider: Any) -> dict[str, Any]:
    """A short, JSON-ready description of a fitted provider for the benchmark report."""
    if isinstance(provider, EmpiricalProvider):
        return {
            "kind": "empirical",
            "quantile": provider.quantile,
            "keys": {f"{c}/{a}": list(map(list, ladder.steps)) for (c, a), ladder in sorted(provider.ladders_.items())},
        }
    if isinstance(provider, FixedProvider):
        return {"kind": "fixed", "bound": provider.bound, "quantile": provider.quantile}
    if isinstance(provider, OracleProvider):
        return {"kind": "oracle"}
    model = getattr(provider, "model", None)
    if model is not None and hasattr(model, "quantile"):
        return {"kind": "learned", "quantile": model.quantile, "model_kind": model.kind,
                "compound": describe_provider(getattr(provider, "fallback", None))}
    return {"kind": type(provider).__name__}
