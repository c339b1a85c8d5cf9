"""Pattern graphs of compound jobs: what is left of a job, from the finished jobs whose start looks like it.

A finished job is a graph of stages (every call of stage s depends on every call of stage s-1). The matcher
keeps, per stage of a stored job, five integers: its calls' longest and total output, longest and total
prompt, and the fan-out (``PatternGraph``); everything it estimates is derived from them.

- **Kernel.** Features are log tokens (scale-free, so one bandwidth fits every app) and log fan-out. The
  squared distance of two graphs is the mean over their common stages of ``sum_f w_f (x_f - y_f)^2 / h^2``,
  output features weighted over prompt ones (the paper's choice: what a call wrote says more about what
  follows than what it read); unknown features (the outputs of the stage being run) are left out. The
  kernel is ``exp(-d^2 / 2)``: symmetric, 1 on identical prefixes. Mean, not sum, so a long chain still
  matches.
- **Matching.** A running job is its finished stages plus the current stage's prompts. Stored graphs of the
  same app are pruned when their prefix no longer fits (fewer stages than the job has reached, a fan-out
  at a stage seen so far that differs by more than ``fanout_ratio``: exact for small fan-outs, a little
  slack for wide ones, where 12 and 13 parallel calls mean the same); the rest are weighted by kernel x mass
  (jobs a stored graph stands for) x freshness. One vectorised pass gives the weights of every prefix of the
  job at once.
- **Estimates.** Of the matches: the weighted median (a point estimate), the weighted mean (the totals
  the policy's priority wants, as ``StageOutlook`` says) and the weighted q-quantile, calibrated (below)
  into the bound. Less than ``min_weight`` of matches: the per-app quantiles over the stored jobs that
  reached the stage (``JobProfile``'s rule), flagged ``fallback``.
- **Calibration.** Conformal, leave-one-out (jackknife): each of up to ``calibration_rows`` stored graphs
  is matched, at each of its stages, against the store *without it*; its score is ``log1p(true) -
  log1p(raw q-quantile)``, and the bound is the raw quantile moved by the q (1 + 1/n)-quantile of the scores
  of that stage (of the nearest stages when it has fewer than ``min_calibration``). Scoring against the
  store as it is, not as it was when each job arrived, matters: a young store's few matches make its raw
  quantile a maximum, and scores taken then would make later bounds too tight. Recomputed when the app's
  graphs grew by ``recalibrate`` of their number, and after consolidation. ``eval-graphs`` measures the
  coverage on jobs the store has not seen.
- **Sub-deadline.** phi(s) = critical-path time through stage s / the job's total, per stored graph
  (decode tokens of the longest call, prefill tokens at ``prefill_weight`` of a decode step, one step per
  stage). The job's phi(s) is the weighted (1-q)-quantile over the matches (an early, conservative
  choice), the running maximum over the job's prefixes (so it never falls as the job unfolds), and 1.0
  once the bound says no stage follows.
- **Bounded memory.** Past ``capacity`` graphs of an app, weighted k-medoids (graphs of another shape
  never merge) keeps ``consolidate_to`` of them, each medoid carrying its cluster's mass. A graph's
  freshness halves every ``half_life`` jobs of its app in which it was not matched; below
  ``min_freshness`` it is dropped.

State is JSON (``to_dict`` / ``from_dict``), never pickle.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from tempo.scheduler.jobs import JobGraph, StageOutlook

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

_log = logging.getLogger("tempo.models.job_graphs")
FORMAT = "tempo.graph_store/1"
# per stage: longest output, total output, longest prompt, total prompt, fan-out (the stored integers)
OUT_MAX, OUT_SUM, PR_MAX, PR_SUM, FAN = range(5)
STATS = 5
# what is estimated after a stage; the first four are critical-path / count figures (bounds in the outlook),
# the last three totals (means in the outlook, as StageOutlook documents)
FIELDS = ("stages_after", "calls_after", "decode_tokens_after", "prefill_tokens_after", "tokens_after",
          "prefill_total_after", "decode_total_after")
INTEGER_FIELDS = frozenset(FIELDS[:4])
_STAGES = FIELDS.index("stages_after")


def _stage_stats(calls: Sequence[tuple[int, int]]) -> list[int]:
    prompts = [int(p) for p, _ in calls]
    outputs = [int(o) for _, o in calls]
    return [max(outputs), sum(outputs), max(prompts), sum(prompts), len(calls)]


def _check_calls(calls: Sequence[tuple[int, int]], where: str) -> None:
    if not calls:
        raise ValueError(f"{where}: a stage needs at least one call")
    for call in calls:
        if len(call) != 2 or min(call) < 0:
            raise ValueError(f"{where}: a call is (prompt tokens, output tokens) >= 0, got {call!r}")


class PatternGraph:
    """A job as the matcher sees it: per stage (longest, total) output and prompt tokens and fan-out.

    ``pending_prompts``: the prompts of the stage being run (its outputs unknown, -1 in ``stats``).
    """

    __slots__ = ("stats",)

    def __init__(self, stages: JobGraph, pending_prompts: Sequence[int] | None = None) -> None:
        rows = []
        for index, calls in enumerate(stages):
            _check_calls(calls, f"stage {index}")
            rows.append(_stage_stats(calls))
        if pending_prompts:
            if min(pending_prompts) < 0:
                raise ValueError("prompt tokens must be >= 0")
            rows.append([-1, -1, max(pending_prompts), sum(pending_prompts), len(pending_prompts)])
        self.stats: IntArray = np.asarray(rows, dtype=np.int64).reshape(len(rows), STATS)

    @property
    def depth(self) -> int:
        """Stages known (the pending one included)."""
        return int(self.stats.shape[0])

    @property
    def complete(self) -> bool:
        return not bool((self.stats[:, OUT_MAX] < 0).any())

    def features(self) -> FloatArray:
        """``[depth, 5]`` log features; NaN where unknown (the pending stage's outputs)."""
        return _features(self.stats)


def _features(stats: IntArray) -> FloatArray:
    """log1p of the token stats and log of the fan-out; NaN for unknown (< 0) or padded (fan-out 0) entries."""
    values = stats.astype(np.float64)
    out = np.full(values.shape, np.nan)
    tokens = values[..., :FAN]
    out[..., :FAN] = np.where(tokens >= 0, np.log1p(np.maximum(tokens, 0.0)), np.nan)
    fan = values[..., FAN]
    out[..., FAN] = np.where(fan > 0, np.log(np.maximum(fan, 1.0)), np.nan)
    padded = values[..., FAN] <= 0
    out[padded] = np.nan
    return out


def _feature_weights(bandwidth: float, output_weight: float, prompt_weight: float, fanout_weight: float) -> FloatArray:
    weights = np.array([output_weight, output_weight, prompt_weight, prompt_weight, fanout_weight], dtype=np.float64)
    return weights / bandwidth**2


def _squared(diff: FloatArray, weights: FloatArray) -> FloatArray:
    """Per stage, the weighted squared difference over the known features (unknown ones count 0)."""
    return np.asarray(np.where(np.isnan(diff), 0.0, diff * diff) @ weights, dtype=np.float64)


def kernel(a: PatternGraph, b: PatternGraph, bandwidth: float = 0.5, output_weight: float = 2.0,
           prompt_weight: float = 1.0, fanout_weight: float = 1.0) -> float:
    """Gaussian similarity of two graphs on their common stages: symmetric, 1.0 when one is a prefix of the
    other, in (0, 1] (floored at the smallest positive float)."""
    depth = min(a.depth, b.depth)
    if depth == 0:
        return 1.0
    weights = _feature_weights(bandwidth, output_weight, prompt_weight, fanout_weight)
    d2 = float(_squared(a.features()[:depth] - b.features()[:depth], weights).sum()) / depth
    return max(math.exp(-0.5 * d2), np.finfo(np.float64).tiny)


def _derive(stats: IntArray, n_stages: IntArray, prefill_weight: float) -> tuple[FloatArray, FloatArray, FloatArray]:
    """From ``[rows, L, 5]`` stats: features, what remains after each stage ``[rows, L, 7]`` and phi ``[rows, L]``."""
    rows, length = stats.shape[:2]
    real = np.arange(length)[None, :] < n_stages[:, None]
    values = stats.astype(np.float64) * real[..., None]
    per_stage = np.stack([
        real.astype(np.float64), values[..., FAN], values[..., OUT_MAX], values[..., PR_MAX],
        values[..., PR_SUM] + values[..., OUT_SUM], values[..., PR_SUM], values[..., OUT_SUM],
    ], axis=-1)
    suffix = np.cumsum(per_stage[:, ::-1], axis=1)[:, ::-1]  # sum over stages >= t
    remaining = np.zeros((rows, length, len(FIELDS)))
    remaining[:, :-1] = suffix[:, 1:]
    time = (values[..., OUT_MAX] + prefill_weight * values[..., PR_MAX] + 1.0) * real
    cumulative = np.cumsum(time, axis=1)
    total = np.maximum(cumulative[:, -1:], 1e-12)
    phi = np.where(real, cumulative / total, 1.0)
    return _features(np.where(real[..., None], stats, 0)), remaining, phi


def remaining_after(graph: JobGraph, prefill_weight: float = 0.01) -> tuple[FloatArray, FloatArray]:
    """The truth of a finished job: what remains after each stage ``[stages, 7]`` (``FIELDS``) and phi per stage."""
    stats = PatternGraph(graph).stats
    _, remaining, phi = _derive(stats[None], np.array([len(stats)], dtype=np.int64), prefill_weight)
    return remaining[0], phi[0]


def _ranked_quantiles(ranked: FloatArray, order: npt.NDArray[np.intp], weights: FloatArray,
                      levels: Sequence[float]) -> FloatArray:
    """Weighted quantiles along axis 0 with the values sorted once per add, not per query: ``ranked`` the values
    sorted along axis 0, ``order`` that sort, ``weights`` of the unsorted values (``ranked``'s shape, or one
    per row). Per
    level, the smallest value whose cumulative weight reaches ``level`` of the total (``quantile_up``'s rule):
    ``[len(levels), *ranked.shape[1:]]``."""
    # one weight per row for every column, or one per value
    sorted_weights = weights[order] if weights.ndim == 1 else np.take_along_axis(weights, order, axis=0)
    cumulative = np.cumsum(sorted_weights, axis=0)
    total = cumulative[-1]
    out = np.empty((len(levels), *ranked.shape[1:]))
    for i, level in enumerate(levels):
        index = np.minimum((cumulative < level * total * (1 - 1e-12)).sum(axis=0), len(ranked) - 1)
        out[i] = np.take_along_axis(ranked, index[None], axis=0)[0]
    return out


@dataclass(frozen=True, slots=True)
class GraphEstimate:
    """What remains of a job after its current stage, from its matches (or the per-app fallback)."""

    median: dict[str, float]  # weighted median of the matches (a point estimate)
    bound: dict[str, float]  # calibrated weighted q-quantile (fallback: the per-app q-quantile)
    mean: dict[str, float]  # weighted mean
    weight: float  # total weight of the matches: kernel x mass x freshness (fallback: the stored jobs' mass)
    samples: float  # effective number of past jobs behind the figures (Kish's, a medoid counting its mass)
    fallback: bool  # True: fewer than min_weight of matches, the per-app quantiles answered
    sub_deadline_fraction: float | None  # phi(s); None when the app is unknown

    def outlook(self) -> StageOutlook:
        """As the policy reads it: bounds on the critical path and stages, means of the totals."""
        return StageOutlook(
            stages_after=int(self.bound["stages_after"]),
            decode_tokens_after=int(self.bound["decode_tokens_after"]),
            prefill_tokens_after=int(self.bound["prefill_tokens_after"]),
            tokens_after=self.mean["tokens_after"],
            prefill_total_after=self.mean["prefill_total_after"],
            decode_total_after=self.mean["decode_total_after"],
            samples=round(self.samples),
            sub_deadline_fraction=self.sub_deadline_fraction,
        )


def _named(values: FloatArray) -> dict[str, float]:
    return {name: float(v) for name, v in zip(FIELDS, values, strict=True)}


EMPTY = GraphEstimate(_named(np.zeros(len(FIELDS))), _named(np.zeros(len(FIELDS))), _named(np.zeros(len(FIELDS))),
                      0.0, 0.0, True, None)


@dataclass
class _AppGraphs:
    """The stored graphs of one app (rows) and their derived arrays, recomputed from ``stats`` only."""

    stats: IntArray  # [rows, L, 5]
    n_stages: IntArray  # [rows]
    mass: FloatArray  # past jobs each row stands for
    last: FloatArray  # the app's clock when the row was last matched (or added)
    touched: BoolArray  # matched since the last add (applied to ``last`` at the next add)
    clock: int = 0  # jobs of this app learned
    since_calibration: int = 0  # adds since the offsets were computed
    dense: FloatArray = field(default_factory=lambda: np.zeros((0, 0, STATS)))  # features, padding as 0
    remaining: FloatArray = field(default_factory=lambda: np.zeros((0, 0, len(FIELDS))))
    phi: FloatArray = field(default_factory=lambda: np.zeros((0, 0)))
    fresh: FloatArray = field(default_factory=lambda: np.zeros(0))
    order: npt.NDArray[np.intp] = field(default_factory=lambda: np.zeros((0, 0, len(FIELDS)), dtype=np.intp))
    ranked: FloatArray = field(default_factory=lambda: np.zeros((0, 0, len(FIELDS))))  # remaining, sorted by row
    phi_order: npt.NDArray[np.intp] = field(default_factory=lambda: np.zeros((0, 0), dtype=np.intp))
    phi_ranked: FloatArray = field(default_factory=lambda: np.zeros((0, 0)))
    offsets: FloatArray = field(default_factory=lambda: np.zeros((0, len(FIELDS))))  # [L, 7] log offsets
    scored: IntArray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # [L] scores behind each stage
    fallbacks: dict[int, GraphEstimate] = field(default_factory=dict)  # cache per stage

    @classmethod
    def empty(cls) -> _AppGraphs:
        return cls(np.zeros((0, 0, STATS), dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0), np.zeros(0),
                   np.zeros(0, dtype=bool))

    def __len__(self) -> int:
        return len(self.n_stages)

    @property
    def length(self) -> int:
        return int(self.stats.shape[1])


@dataclass
class GraphStore:
    """Pattern graphs of finished compound jobs, per app; ``outlook`` satisfies ``JobOutlookSource``.

    ``add`` learns one finished job online; ``estimate`` /
    ``outlook`` match a running job. Parameters (see the module docstring): ``capacity`` graphs per app
    before k-medoids keeps ``consolidate_to`` of them; ``quantile`` of the bound; Gaussian ``bandwidth`` in
    log tokens and the feature weights; ``min_weight`` of matches below which the per-app quantiles answer;
    ``match_floor``: the kernel value that counts as a match for freshness; ``half_life`` (jobs of the app;
    ``math.inf``: no decay) and ``min_freshness``; ``prefill_weight``: a prefill token's time in decode
    steps, for phi; ``fanout_ratio``: the largest ratio of fan-outs that still match; calibration:
    ``calibration_rows`` stored graphs scored, ``min_calibration`` scores for a stage's own offset,
    ``recalibrate`` (growth as a fraction of the stored graphs before the offsets are recomputed).

    >>> store = GraphStore(capacity=50)
    >>> for i in range(40):  # short jobs (a small first answer) end after 2 stages, long ones after 4
    ...     first = 30 if i % 2 else 400
    ...     store.add("research", [[(100, first)]] + [[(200, 300)]] * (1 if i % 2 else 3))
    >>> store.outlook("research", 1, history=[[(100, 30)]], stage_prompts=[200]).stages_after
    0
    >>> store.outlook("research", 1, history=[[(100, 400)]], stage_prompts=[200]).stages_after
    2
    """

    capacity: int = 500
    quantile: float = 0.9
    bandwidth: float = 0.5
    output_weight: float = 2.0
    prompt_weight: float = 1.0
    fanout_weight: float = 1.0
    fanout_ratio: float = 1.25
    min_weight: float = 2.0
    match_floor: float = 0.05
    half_life: float = 2000.0
    min_freshness: float = 0.05
    consolidate_to: float = 0.75
    prefill_weight: float = 0.01
    calibration_rows: int = 200
    min_calibration: int = 30
    recalibrate: float = 0.1
    seed: int = 0
    _apps: dict[str, _AppGraphs] = field(default_factory=dict, init=False, repr=False)
    _weights: FloatArray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.quantile < 1:
            raise ValueError("quantile must be in (0, 1)")
        if self.capacity < 2 or not 0 < self.consolidate_to < 1:
            raise ValueError("capacity must be >= 2 and consolidate_to in (0, 1)")
        if self.bandwidth <= 0 or self.half_life <= 0 or self.min_weight <= 0:
            raise ValueError("bandwidth, half_life and min_weight must be positive")
        self._weights = _feature_weights(self.bandwidth, self.output_weight, self.prompt_weight, self.fanout_weight)

    # -- the store ---------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return sum(len(graphs) for graphs in self._apps.values())

    def apps(self) -> dict[str, int]:
        """Stored graphs per app."""
        return {app: len(graphs) for app, graphs in self._apps.items()}

    def mass(self, app: str) -> float:
        """Past jobs the app's stored graphs stand for (decayed ones included until dropped)."""
        graphs = self._apps.get(app)
        return float(graphs.mass.sum()) if graphs is not None else 0.0

    def nbytes(self) -> int:
        """Bytes held by the arrays (the Python objects around them not counted)."""
        total = 0
        for graphs in self._apps.values():
            arrays = (graphs.stats, graphs.n_stages, graphs.mass, graphs.last, graphs.touched, graphs.dense,
                      graphs.remaining, graphs.phi, graphs.fresh, graphs.order, graphs.ranked, graphs.phi_order,
                      graphs.phi_ranked, graphs.offsets, graphs.scored)
            total += sum(a.nbytes for a in arrays)
        return total

    def add(self, app: str, graph: JobGraph) -> None:
        """Learn one finished job: store it, decay and consolidate, recalibrate when due."""
        if not graph:
            raise ValueError("a job needs at least one stage")
        pattern = PatternGraph(graph)
        graphs = self._apps.setdefault(app, _AppGraphs.empty())
        graphs.clock += 1
        graphs.last[graphs.touched] = graphs.clock
        graphs.touched[:] = False
        self._append(graphs, pattern.stats, 1.0, float(graphs.clock))
        self._decay(graphs)
        consolidated = len(graphs) > self.capacity
        if consolidated:
            self._consolidate(graphs)
        graphs.since_calibration += 1
        self._refresh(graphs, recalibrate=consolidated
                      or graphs.since_calibration >= max(1.0, self.recalibrate * len(graphs)))

    def extend(self, jobs: Iterable[tuple[str, JobGraph]]) -> GraphStore:
        """``add`` each ``(app, graph)`` in order; returns the store."""
        for app, graph in jobs:
            self.add(app, graph)
        return self

    # -- estimates ---------------------------------------------------------------------------------------------
    def outlook(self, app: str, stage: int, history: JobGraph = (), stage_prompts: Sequence[int] = ()) -> StageOutlook:
        """``JobOutlookSource``: the estimate of what remains after ``stage`` as the policy reads it."""
        return self.estimate(app, stage, history, stage_prompts).outlook()

    def estimate(self, app: str, stage: int, history: JobGraph = (), stage_prompts: Sequence[int] = ()
                 ) -> GraphEstimate:
        """Match the job's finished stages (``history``, the first ``stage`` of them are used) and the current
        stage's prompts against the app's stored graphs. Without the whole history, the per-app fallback."""
        graphs = self._apps.get(app)
        if graphs is None or not len(graphs):
            return EMPTY
        if stage < 0:
            raise ValueError("stage must be >= 0")
        if len(history) < stage:
            return self._fallback_with_phi(graphs, stage)
        query = PatternGraph(history[:stage], stage_prompts)
        stats = query.stats
        if not stage_prompts:  # nothing known of the current stage: a wildcard row
            stats = np.vstack([stats, np.array([[-1, -1, -1, -1, 0]], dtype=np.int64)])
        return self._match(graphs, stats, mark=True)

    def fallback(self, app: str, stage: int) -> GraphEstimate:
        """The per-app quantiles at ``stage`` over the stored jobs that reached it (``JobProfile``'s rule)."""
        graphs = self._apps.get(app)
        if graphs is None or not len(graphs):
            return EMPTY
        return self._fallback_with_phi(graphs, stage)

    def calibration(self) -> dict[str, Any]:
        """Per app and stage: leave-one-out scores behind the offset, and the log offsets of each field."""
        return {app: {str(s): {"scores": int(graphs.scored[s]), "offsets": _named(graphs.offsets[s])}
                      for s in range(graphs.length)} for app, graphs in self._apps.items()}

    # -- matching ----------------------------------------------------------------------------------------------
    def _prefix_weights(self, graphs: _AppGraphs, query: IntArray) -> tuple[FloatArray, FloatArray, BoolArray]:
        """For each prefix j of the query (stages < j finished, stage j's prompts): kernel ``[n, d]``, match
        weights ``[n, d]`` (kernel x mass x freshness, 0 where pruned) and the pruning mask."""
        depth = query.shape[0]
        n, length = len(graphs), graphs.length
        usable = min(depth, length)
        kernel_values = np.zeros((n, depth))
        valid = np.zeros((n, depth), dtype=bool)
        if usable:
            known = _features(query[:usable])
            sq = graphs.dense[:, :usable] - np.nan_to_num(known)[None]
            sq *= sq
            full = sq @ self._weights  # [n, usable]; the pending row's unknown outputs are never read from it
            prompt_only = sq[..., PR_MAX:] @ self._weights[PR_MAX:]
            prompt_only[:, np.isnan(known[:, PR_MAX])] = 0.0  # a wildcard row: nothing known to compare
            before = np.zeros_like(full)
            before[:, 1:] = np.cumsum(full, axis=1)[:, :-1]
            d2 = (before + prompt_only) / np.arange(1, usable + 1)
            kernel_values[:, :usable] = np.exp(-0.5 * d2)
            wanted = query[:usable, FAN][None]
            stored = graphs.stats[:, :usable, FAN]
            fan_ok = (np.maximum(stored, wanted) <= self.fanout_ratio * np.minimum(stored, wanted)) | (wanted == 0)
            reached = graphs.n_stages[:, None] > np.arange(usable)[None]
            valid[:, :usable] = np.logical_and.accumulate(fan_ok & reached, axis=1)
        weights = kernel_values * valid * (graphs.mass * graphs.fresh)[:, None]
        return kernel_values, weights, valid

    def _match(self, graphs: _AppGraphs, query: IntArray, mark: bool) -> GraphEstimate:
        stage = query.shape[0] - 1
        kernel_values, weights, valid = self._prefix_weights(graphs, query)
        w = weights[:, stage]
        if not np.isfinite(w).all():  # never expected: say what it came from, let the per-app quantiles answer
            _log.warning("graph store: non-finite match weights (kernel %s, mass %s, freshness %s)",
                         np.isfinite(kernel_values[:, stage]).all(), np.isfinite(graphs.mass).all(),
                         np.isfinite(graphs.fresh).all())
            return self._fallback_with_phi(graphs, stage)
        total = float(w.sum())
        if mark:
            graphs.touched |= valid[:, stage] & (kernel_values[:, stage] >= self.match_floor)
        phi = self._phi(graphs, weights)
        if total < self.min_weight or stage >= graphs.length:
            fallback = self._fallback(graphs, stage)
            return _with_phi(fallback, max(phi, fallback.sub_deadline_fraction or 0.0))
        ranked = graphs.ranked[:, stage]
        median, raw = _ranked_quantiles(ranked, graphs.order[:, stage], w, (0.5, self.quantile))
        mean = w @ graphs.remaining[:, stage] / total
        bound = self._calibrated(raw, graphs.offsets[stage])
        matched = w > 0
        samples = total**2 / float(np.sum(w[matched] ** 2 / graphs.mass[matched]))
        if bound[_STAGES] <= 0:
            phi = 1.0
        return GraphEstimate(_named(median), _named(bound), _named(mean), total, samples, False, phi)

    def _phi(self, graphs: _AppGraphs, weights: FloatArray) -> float:
        """Running maximum over the query's prefixes of the weighted (1-q)-quantile of the matches' phi (the
        per-app weights where a prefix has too few matches), 1.0 at a prefix whose stages bound is 0 and past
        every stored stage. Every prefix is judged as its own query would be, so phi never falls as a job
        unfolds against the same store."""
        depth = weights.shape[1]
        usable = min(depth, graphs.length)
        if usable < depth:
            return 1.0
        base = (graphs.mass * graphs.fresh)[:, None] * (graphs.n_stages[:, None] > np.arange(usable)[None])
        matched = weights[:, :usable].sum(axis=0) >= self.min_weight
        w = np.where(matched[None], weights[:, :usable], base)
        totals = w.sum(axis=0)
        per_prefix = _ranked_quantiles(graphs.phi_ranked[:, :usable], graphs.phi_order[:, :usable], w,
                                       (1.0 - self.quantile,))[0]
        stages = _ranked_quantiles(graphs.ranked[:, :usable, _STAGES], graphs.order[:, :usable, _STAGES], w,
                                   (self.quantile,))[0]
        calibrated = np.maximum(np.ceil(np.expm1(np.log1p(stages) + graphs.offsets[:usable, _STAGES]) - 1e-9), 0)
        stages = np.where(matched, calibrated, stages)  # as _calibrated does for the stages bound
        per_prefix = np.where((totals > 0) & (stages > 0), per_prefix, 1.0)
        return float(np.max(per_prefix))

    def _fallback(self, graphs: _AppGraphs, stage: int) -> GraphEstimate:
        cached = graphs.fallbacks.get(stage)
        if cached is not None:
            return cached
        reached = graphs.n_stages > stage
        if not reached.any():  # past every stored job: assume this is the last stage
            deepest = float(graphs.mass[graphs.n_stages == graphs.n_stages.max()].sum())
            zeros = _named(np.zeros(len(FIELDS)))
            estimate = GraphEstimate(zeros, zeros, zeros, 0.0, deepest, True, 1.0)
        else:
            w = graphs.mass * graphs.fresh * reached
            ranked = graphs.ranked[:, stage]
            median, bound = _ranked_quantiles(ranked, graphs.order[:, stage], w, (0.5, self.quantile))
            phi = float(_ranked_quantiles(graphs.phi_ranked[:, stage], graphs.phi_order[:, stage], w,
                                          (1.0 - self.quantile,))[0])
            if bound[_STAGES] <= 0:
                phi = 1.0
            mean = w @ graphs.remaining[:, stage] / w.sum()
            estimate = GraphEstimate(_named(median), _named(bound), _named(mean), float(w.sum()),
                                     float(graphs.mass[reached].sum()), True, phi)
        graphs.fallbacks[stage] = estimate
        return estimate

    def _fallback_with_phi(self, graphs: _AppGraphs, stage: int) -> GraphEstimate:
        """The fallback at ``stage`` with phi the running maximum of the fallback's phi over stages <= stage."""
        phi = max(self._fallback(graphs, s).sub_deadline_fraction or 0.0 for s in range(stage + 1))
        return _with_phi(self._fallback(graphs, stage), phi)

    # -- calibration -------------------------------------------------------------------------------------------
    def _calibrate(self, graphs: _AppGraphs) -> None:
        """Leave-one-out scores of (up to ``calibration_rows``) stored graphs at each of their stages, and the
        per-stage log offsets from them (see the module docstring)."""
        n, length = len(graphs), graphs.length
        rows = np.arange(n)
        if n > self.calibration_rows:
            rows = np.sort(np.random.default_rng([self.seed, graphs.clock]).choice(n, self.calibration_rows,
                                                                                    replace=False))
        stage_of: list[IntArray] = []
        scores: list[FloatArray] = []
        for i in rows:
            depth = int(graphs.n_stages[i])
            _, weights, _ = self._prefix_weights(graphs, graphs.stats[i, :depth])
            weights[i] = 0.0
            columns = np.flatnonzero(weights.sum(axis=0) >= self.min_weight)
            if not len(columns):
                continue
            ranked = graphs.ranked[:, columns]  # [n, c, 7]
            raw = _ranked_quantiles(ranked, graphs.order[:, columns],
                                    np.broadcast_to(weights[:, columns, None], ranked.shape), (self.quantile,))[0]
            scores.append(np.log1p(graphs.remaining[i, columns]) - np.log1p(raw))
            stage_of.append(columns)
        offsets = np.zeros((length, len(FIELDS)))
        scored = np.zeros(length, dtype=np.int64)
        if scores:
            all_scores, all_stages = np.concatenate(scores), np.concatenate(stage_of)
            for stage in range(length):
                radius = 0
                while True:  # the stage's own scores, else those of the nearest stages too
                    near = np.abs(all_stages - stage) <= radius
                    if near.sum() >= self.min_calibration or radius >= length:
                        break
                    radius += 1
                chosen = all_scores[near]
                scored[stage] = len(chosen)
                level = self.quantile * (1 + 1 / len(chosen))
                if level >= 1:
                    offsets[stage] = chosen.max(axis=0)
                else:
                    offsets[stage] = np.quantile(chosen, level, axis=0, method="inverted_cdf")
        graphs.offsets, graphs.scored = offsets, scored
        graphs.since_calibration = 0

    @staticmethod
    def _calibrated(raw: FloatArray, offsets: FloatArray) -> FloatArray:
        bound = np.maximum(np.expm1(np.log1p(raw) + offsets), 0.0)
        integer = np.arange(len(FIELDS)) < len(INTEGER_FIELDS)
        return np.where(integer, np.ceil(bound - 1e-9), bound)

    # -- memory: append, decay, consolidate ----------------------------------------------------------------------
    def _append(self, graphs: _AppGraphs, stats: IntArray, mass: float, last: float) -> None:
        depth = stats.shape[0]
        if depth > graphs.length:
            graphs.stats = np.pad(graphs.stats, ((0, 0), (0, depth - graphs.length), (0, 0)))
        row = np.zeros((1, graphs.length, STATS), dtype=np.int64)
        row[0, :depth] = stats
        graphs.stats = np.concatenate([graphs.stats, row])
        graphs.n_stages = np.append(graphs.n_stages, depth)
        graphs.mass = np.append(graphs.mass, mass)
        graphs.last = np.append(graphs.last, last)
        graphs.touched = np.append(graphs.touched, False)

    def _freshness(self, graphs: _AppGraphs) -> FloatArray:
        if math.isinf(self.half_life):
            return np.ones(len(graphs))
        return np.asarray(0.5 ** ((graphs.clock - graphs.last) / self.half_life), dtype=np.float64)

    def _decay(self, graphs: _AppGraphs) -> None:
        keep = self._freshness(graphs) >= self.min_freshness
        if not keep.all():
            self._select(graphs, np.flatnonzero(keep))

    def _select(self, graphs: _AppGraphs, rows: npt.NDArray[np.integer[Any]], mass: FloatArray | None = None,
                last: FloatArray | None = None) -> None:
        graphs.stats = graphs.stats[rows]
        graphs.n_stages = graphs.n_stages[rows]
        graphs.mass = graphs.mass[rows] if mass is None else mass
        graphs.last = graphs.last[rows] if last is None else last
        graphs.touched = graphs.touched[rows]
        if len(graphs):
            length = int(graphs.n_stages.max())
            graphs.stats = graphs.stats[:, :length]

    def _consolidate(self, graphs: _AppGraphs) -> None:
        """Weighted k-medoids down to ``consolidate_to`` of the capacity; each medoid takes its cluster's mass
        and its most recent match. Graphs of another shape (stages, fan-outs) are never merged."""
        k = max(1, int(self.capacity * self.consolidate_to))
        features, _, _ = _derive(graphs.stats, graphs.n_stages, self.prefill_weight)
        x = np.nan_to_num(features).reshape(len(graphs), -1) * np.sqrt(np.tile(self._weights, graphs.length))
        sq = np.einsum("ij,ij->i", x, x)
        distance = np.maximum(sq[:, None] + sq[None] - 2 * x @ x.T, 0.0)
        shape = np.concatenate([graphs.n_stages[:, None], graphs.stats[:, :, FAN]], axis=1)
        _, shape_id = np.unique(shape, axis=0, return_inverse=True)
        shape_id = shape_id.reshape(-1)
        distance += np.where(shape_id[:, None] != shape_id[None], 1e6 + distance.max(), 0.0)
        rng = np.random.default_rng([self.seed, graphs.clock])
        medoids, labels = weighted_kmedoids(distance, graphs.mass, k, rng)
        mass = np.asarray(np.bincount(labels, weights=graphs.mass, minlength=len(medoids)), dtype=np.float64)
        last = np.full(len(medoids), -np.inf)
        np.maximum.at(last, labels, graphs.last)
        touched = np.zeros(len(medoids), dtype=bool)
        np.logical_or.at(touched, labels, graphs.touched)
        self._select(graphs, medoids, mass, last)
        graphs.touched = touched

    def _refresh(self, graphs: _AppGraphs, recalibrate: bool) -> None:
        features, graphs.remaining, graphs.phi = _derive(graphs.stats, graphs.n_stages, self.prefill_weight)
        graphs.dense = np.nan_to_num(features)
        graphs.fresh = self._freshness(graphs)
        graphs.order = np.argsort(graphs.remaining, axis=0, kind="stable")
        graphs.ranked = np.take_along_axis(graphs.remaining, graphs.order, axis=0)
        graphs.phi_order = np.argsort(graphs.phi, axis=0, kind="stable")
        graphs.phi_ranked = np.take_along_axis(graphs.phi, graphs.phi_order, axis=0)
        graphs.fallbacks.clear()
        if recalibrate or graphs.offsets.shape[0] != graphs.length:
            self._calibrate(graphs)

    # -- JSON --------------------------------------------------------------------------------------------------
    PARAMS = ("capacity", "quantile", "bandwidth", "output_weight", "prompt_weight", "fanout_weight", "min_weight",
              "fanout_ratio", "match_floor", "half_life", "min_freshness", "consolidate_to", "prefill_weight",
              "calibration_rows", "min_calibration", "recalibrate", "seed")

    def to_dict(self) -> dict[str, Any]:
        """The whole state as JSON-ready data (``half_life`` inf is written as null)."""
        params: dict[str, Any] = {name: getattr(self, name) for name in self.PARAMS}
        if math.isinf(self.half_life):
            params["half_life"] = None
        apps = {}
        for app, graphs in self._apps.items():
            apps[app] = {
                "clock": graphs.clock,
                "graphs": [stats[:n].tolist() for stats, n in zip(graphs.stats, graphs.n_stages, strict=True)],
                "mass": graphs.mass.tolist(),
                "last": graphs.last.tolist(),
                "touched": graphs.touched.tolist(),
                "offsets": graphs.offsets.tolist(),
                "scored": graphs.scored.tolist(),
                "since_calibration": graphs.since_calibration,
            }
        return {"format": FORMAT, "params": params, "apps": apps}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GraphStore:
        """Rebuild a store from ``to_dict``'s data; ValueError when it is not one."""
        try:
            if data.get("format") != FORMAT:
                raise ValueError(f"not a graph store (format {data.get('format')!r}, expected {FORMAT!r})")
            params = dict(data["params"])
            if params.get("half_life") is None:
                params["half_life"] = math.inf
            store = cls(**{name: params[name] for name in cls.PARAMS})
            for app, saved in data["apps"].items():
                graphs = _AppGraphs.empty()
                graphs.clock = int(saved["clock"])
                for stats, mass, last in zip(saved["graphs"], saved["mass"], saved["last"], strict=True):
                    store._append(graphs, np.asarray(stats, dtype=np.int64).reshape(-1, STATS), float(mass),
                                  float(last))
                graphs.touched = np.asarray(saved["touched"], dtype=bool).reshape(len(graphs))
                graphs.offsets = np.asarray(saved["offsets"], dtype=np.float64).reshape(-1, len(FIELDS))
                graphs.scored = np.asarray(saved["scored"], dtype=np.int64).reshape(-1)
                graphs.since_calibration = int(saved["since_calibration"])
                store._refresh(graphs, recalibrate=False)  # recalibrates only when the offsets do not fit
                store._apps[str(app)] = graphs
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a graph store: {exc!r}") from None
        return store


def _with_phi(estimate: GraphEstimate, phi: float) -> GraphEstimate:
    return GraphEstimate(estimate.median, estimate.bound, estimate.mean, estimate.weight, estimate.samples,
                         estimate.fallback, phi)


def weighted_kmedoids(distance: FloatArray, mass: FloatArray, k: int, rng: np.random.Generator,
                      iterations: int = 20) -> tuple[IntArray, IntArray]:
    """Medoid rows and each row's cluster (an index into the medoids) minimising ``sum mass_i d(i, medoid)``:
    k-medoids++ seeding, then alternating assignment and medoid update (Park and Jun) until stable."""
    n = len(mass)
    if k >= n:
        return np.arange(n, dtype=np.int64), np.arange(n, dtype=np.int64)
    medoids = [int(rng.choice(n, p=mass / mass.sum()))]
    nearest = distance[medoids[0]].copy()
    for _ in range(k - 1):
        p = mass * nearest
        p[medoids] = 0.0
        if p.sum() <= 0:  # every row sits on a medoid already: take any other
            p = np.ones(n)
            p[medoids] = 0.0
        pick = int(rng.choice(n, p=p / p.sum()))
        medoids.append(pick)
        nearest = np.minimum(nearest, distance[pick])
    chosen = np.asarray(medoids, dtype=np.int64)

    def assign(medoid_rows: IntArray) -> IntArray:
        """Nearest medoid per row, each medoid in its own cluster: among duplicate graphs (distance 0) argmin
        would hand a medoid to another's cluster, whose update could then pick it too, leaving two clusters
        on one row and one of them empty (zero mass: NaN weights downstream)."""
        nearest_medoid = np.argmin(distance[:, medoid_rows], axis=1)
        nearest_medoid[medoid_rows] = np.arange(len(medoid_rows))
        return nearest_medoid

    labels = assign(chosen)
    for _ in range(iterations):
        updated = chosen.copy()
        for c in range(k):
            members = np.flatnonzero(labels == c)
            if len(members) > 1:
                cost = mass[members] @ distance[np.ix_(members, members)]
                updated[c] = members[int(np.argmin(cost))]
        new_labels = assign(updated)
        if np.array_equal(updated, chosen) and np.array_equal(new_labels, labels):
            break
        chosen, labels = updated, new_labels
    return chosen, labels.astype(np.int64)
