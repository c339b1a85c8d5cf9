"""The goodput benchmark: every policy on the same workload per rate, on the engine simulator.

Per rate it builds one workload (or reads the given file), fits the bound provider and the compound-job
profile on a disjoint training set, then replays the workload once per policy and accounts the outcomes.
Every figure is per second of the *arrival window* (the workload's duration), the same denominator for
every policy; each run continues until its last request is done (or rejected), so goodput earned after the
window still counts and a policy gains nothing by rejecting work to end early.

Policy specs: ``NAME[:ESTIMATOR][@key=value[+key=value...]]``, e.g. ``tempo``, ``tempo:fixed`` (Tempo
without the estimator), ``tempo@p=2``, ``oracle``.
"""

from __future__ import annotations

import copy
import math
import platform
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from tempo.scheduler.bounds import BoundLadder
from tempo.scheduler.goodput import GoodputReport, account, delivered_tokens
from tempo.scheduler.jobs import OracleTruth
from tempo.scheduler.registry import PolicyContext, make_policy, needs_truth, policy_names
from tempo.serving.bounds.providers import (
    ProviderContext,
    build_cached,
    describe_provider,
    fit_job_graphs,
    fit_job_profile,
    make_provider,
    provider_names,
    queries_for,
    training_workload,
)
from tempo.serving.profiles.profile import DEFAULT_PROFILE, Profile, load_profile
from tempo.serving.sim.simulator import SimResult, Simulator
from tempo.serving.workloads.builder import ClassMix, WorkloadSpec
from tempo.serving.workloads.format import WorkloadRequest, read_workload
from tempo.serving.workloads.sources import azure_conv_trace_path

from tempo.errors import TempoError

SCHEMA_VERSION = 1
DEFAULT_POLICIES = (
    "fcfs", "priority", "edf", "sjf", "srtf", "autellix", "tempo", "oracle", "tempo:fixed", "tempo-sjf",
)
BASELINES = ("fcfs", "priority", "edf", "sjf", "srtf", "autellix")
# Rates as multiples of the FCFS saturation rate of the default profile (see docs/scheduler.md):
# light, 1.5x and 2x overloaded. (At 1.25x the offered goodput is only ~1.5x what FCFS attains, so a
# 1.5x-FCFS target could not be met there by any policy.)
DEFAULT_LOAD_FACTORS = (0.5, 1.5, 2.0)
QUICK_LOAD_FACTORS = (1.5, 2.0)
DEFAULT_SATURATION_RPS = 2.27  # a100-llama3-8b, mix 1:1:1, Azure conv arrivals: `tempo bench --find-capacity`
QUICK_DURATION_S = 240.0


# ------------------------------------------------------------------ specs
@dataclass(frozen=True)
class PolicySpec:
    """One policy of a benchmark: registered name, bound provider, parameters."""

    name: str
    estimator: str = "empirical"
    params: tuple[tuple[str, str], ...] = ()

    @property
    def label(self) -> str:
        default = "oracle" if needs_truth(self.name) else "empirical"
        text = self.name if self.estimator == default else f"{self.name}:{self.estimator}"
        if self.params:
            text += "@" + "+".join(f"{k}={v}" for k, v in self.params)
        return text

    @classmethod
    def parse(cls, text: str, default_estimator: str = "empirical") -> PolicySpec:
        text = text.strip()
        head, _, params_text = text.partition("@")
        name, _, estimator = head.partition(":")
        params: list[tuple[str, str]] = []
        for part in filter(None, params_text.split("+")):
            key, eq, value = part.partition("=")
            if not eq or not key:
                raise TempoError(f"bad policy spec {text!r}: parameters are key=value joined by '+'")
            params.append((key.strip(), value.strip()))
        known = policy_names()
        if name not in known:
            raise TempoError(f"unknown policy {name!r} (known: {', '.join(known)})")
        estimator = estimator or ("oracle" if needs_truth(name) else default_estimator)
        if estimator not in provider_names():
            raise TempoError(f"unknown estimator {estimator!r} (known: {', '.join(provider_names())})")
        return cls(name, estimator, tuple(params))


def parse_policies(text: str, default_estimator: str = "empirical") -> list[PolicySpec]:
    specs = [PolicySpec.parse(p, default_estimator) for p in text.split(",") if p.strip()]
    if not specs:
        raise TempoError("--policies lists no policy")
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise TempoError(f"--policies lists a policy twice: {labels}")
    return specs


def parse_floats(text: str, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise TempoError(f"{what}: expected comma-separated numbers, got {text!r}") from None
    if not values or any(not (math.isfinite(v) and v > 0) for v in values):
        raise TempoError(f"{what}: every value must be a positive number, got {text!r}")
    return values


@dataclass
class BenchConfig:
    policies: list[PolicySpec]
    profile: str = DEFAULT_PROFILE
    rps: list[float] = field(default_factory=list)  # empty with a workload file: its own rate
    workload: Path | None = None
    duration_s: float = 600.0
    mix: str = "1:1:1:0"
    arrivals: str = "azure-conv"
    seed: int = 0
    tiers: tuple[int, ...] = (1, 2, 3, 4)
    model: str | None = None
    quantile: float = 0.9
    decode_weight: float = 1.0
    step_noise: float = 0.0
    charge_decisions: bool = False  # add each decision's measured time to the simulated clock
    training_size: int = 6000
    prompt_split: str | None = None  # draw benchmark prompts from this CASTILLO hash split (e.g. "test")

    def arrivals_path(self) -> str:
        return str(azure_conv_trace_path()) if self.arrivals == "azure-conv" else self.arrivals

    def spec(self, rps: float) -> WorkloadSpec:
        kwargs: dict[str, Any] = {}
        if self.model:
            kwargs["model"] = self.model
        if self.prompt_split:
            kwargs["prompt_split"] = self.prompt_split
        return WorkloadSpec(
            rps=rps,
            duration_s=self.duration_s,
            mix=ClassMix.parse(self.mix),
            arrivals=self.arrivals_path(),
            seed=self.seed,
            tiers=self.tiers,
            **kwargs,
        )


# ------------------------------------------------------------ JSON schema
class LatencyOut(BaseModel):
    count: int
    p50: float | None
    p90: float | None
    p99: float | None


class ClassOut(BaseModel):
    units: int
    met: int
    attainment: float | None
    good_tokens: float
    delivered_tokens: float
    ttft_s: LatencyOut
    tbt_s: LatencyOut
    e2e_s: LatencyOut


class DecisionTimeOut(BaseModel):
    decisions: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float


class RunOut(BaseModel):
    """One policy at one rate."""

    model_config = ConfigDict(extra="forbid")

    policy: str  # the spec label, e.g. "tempo:fixed"
    policy_name: str
    estimator: str
    params: dict[str, Any]
    rps: float
    requests: int
    arrivals: int
    window_s: float
    token_goodput: float  # good tokens / window second (the headline)
    request_goodput: float  # requests (compound: jobs) that met their SLO / window second
    raw_throughput: float  # tokens delivered within the window / window second
    delivered_throughput: float  # every token delivered, whenever, / window second
    per_class: dict[str, ClassOut]
    preemptions: int
    preemptions_recompute: int
    preemptions_swap: int
    engine_preemptions: int
    recomputed_tokens: int
    rejections: int
    demotions: int
    decision_time: DecisionTimeOut
    steps: int
    sim_end_s: float
    truncated: bool
    wall_s: float
    policy_config: dict[str, Any]


class RateSummary(BaseModel):
    rps: float
    load_factor: float | None
    fcfs: float | None
    best_baseline: str | None
    best_baseline_goodput: float | None
    tempo: float | None
    oracle: float | None
    tempo_vs_fcfs: float | None
    tempo_vs_best_baseline: float | None
    tempo_vs_oracle: float | None
    throughput_vs_fcfs: float | None
    ablations: dict[str, float]  # label -> token goodput / tempo's


class BenchOut(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    created_by: str = "tempo bench"
    config: dict[str, Any]
    profile: dict[str, Any]
    saturation_rps: float | None
    estimators: dict[str, dict[str, Any]]
    runs: list[RunOut]
    summary: list[RateSummary]
    environment: dict[str, str] = Field(default_factory=dict)


# --------------------------------------------------------------- running
@dataclass
class RateSetup:
    """Everything shared by the policies at one rate."""

    rps: float
    workload: list[WorkloadRequest]
    window_s: float
    training: list[WorkloadRequest]
    truth: OracleTruth
    ladders: dict[str, dict[str, BoundLadder]] = field(default_factory=dict)
    estimators: dict[str, dict[str, Any]] = field(default_factory=dict)
    job_profile: Any = None
    job_graphs: Any = None  # the pattern-graph store of the training jobs


def fresh_store(store: Any) -> Any:
    """A copy of the training jobs' graph store for one run: matching marks what it used (decay), so runs
    must not share one."""
    return copy.deepcopy(store) if store is not None else None


def build_truth(workload: Sequence[WorkloadRequest]) -> OracleTruth:
    jobs: dict[str, dict[int, list[tuple[int, int]]]] = defaultdict(lambda: defaultdict(list))
    for w in workload:
        if w.job_id is not None:
            jobs[w.job_id][w.stage or 0].append((w.prompt_tokens, w.output_tokens))
    graphs = {j: tuple(tuple(stages[s]) for s in sorted(stages)) for j, stages in jobs.items()}
    return OracleTruth({w.id: w.output_tokens for w in workload}, graphs)


def workload_window(workload: Sequence[WorkloadRequest], duration_s: float | None) -> float:
    if duration_s is not None:
        return duration_s
    arrivals = [w.arrival_s for w in workload]
    return max(1e-9, max(arrivals) - min(arrivals)) if arrivals else 1.0


def setup_rate(config: BenchConfig, rps: float | None) -> RateSetup:
    if config.workload is not None:
        workload = read_workload(config.workload)
        if not workload:
            raise TempoError(f"{config.workload}: the workload is empty")
        window = workload_window(workload, None)
        arrivals = len({w.job_id or w.id for w in workload})
        rate = arrivals / window
        base = config.spec(rate)
    else:
        assert rps is not None
        base = config.spec(rps)
        workload = build_cached(base)
        window, rate = config.duration_s, rps
    training = training_workload(base, workload, size=config.training_size)
    setup = RateSetup(rate, workload, window, training, build_truth(workload))
    setup.job_profile = fit_job_profile(training, config.quantile)
    setup.job_graphs = fit_job_graphs(training, config.quantile)
    return setup


def ladders_for(setup: RateSetup, estimator: str, quantile: float) -> dict[str, BoundLadder]:
    if estimator not in setup.ladders:
        provider = make_provider(
            estimator, ProviderContext(setup.training, quantile, truth=setup.truth.lengths)
        )
        ladders = provider.ladders(queries_for(setup.workload))
        setup.ladders[estimator] = {w.id: ladder for w, ladder in zip(setup.workload, ladders, strict=True)}
        setup.estimators[estimator] = describe_provider(provider)
    return setup.ladders[estimator]


def window_throughput(result: SimResult, window_end: float, decode_weight: float) -> float:
    """Tokens delivered by ``window_end`` (prompt when its first token is out) per window second."""
    total = 0.0
    for o in result.outcomes:
        times = o.token_times_s
        if not times or times[0] > window_end:
            continue
        on = sum(1 for t in times if t <= window_end)
        total += o.prompt_tokens + decode_weight * on
    return total / window_end if window_end > 0 else 0.0


def run_one(
    config: BenchConfig,
    setup: RateSetup,
    spec: PolicySpec,
    profile: Profile,
    progress: Callable[[float], None] | None = None,
) -> tuple[RunOut, SimResult]:
    truth = setup.truth if needs_truth(spec.name) else None
    context = PolicyContext(job_profile=setup.job_profile, job_graphs=fresh_store(setup.job_graphs), truth=truth)
    try:
        policy = make_policy(spec.name, context, **dict(spec.params))
    except (TypeError, ValueError) as exc:
        raise TempoError(f"policy {spec.label}: {exc}") from None
    ladders = ladders_for(setup, spec.estimator, config.quantile)
    started = time.perf_counter()
    sim = Simulator(
        setup.workload,
        ladders,
        policy,
        profile,
        rng=np.random.default_rng(config.seed),
        step_noise=config.step_noise,
        charge_decisions=config.charge_decisions,
    )
    result = sim.run(progress)
    wall = time.perf_counter() - started
    report = account(result.outcomes, decode_weight=config.decode_weight, duration_s=setup.window_s)
    first = min((w.arrival_s for w in setup.workload), default=0.0)
    return _run_out(config, setup, spec, policy.describe(), report, result, wall, first), result


def _decision_out(samples: Sequence[float]) -> DecisionTimeOut:
    if not samples:
        return DecisionTimeOut(decisions=0, p50_ms=0.0, p99_ms=0.0, mean_ms=0.0, max_ms=0.0)
    arr = np.asarray(samples) * 1e3
    return DecisionTimeOut(
        decisions=len(arr),
        p50_ms=float(np.percentile(arr, 50)),
        p99_ms=float(np.percentile(arr, 99)),
        mean_ms=float(arr.mean()),
        max_ms=float(arr.max()),
    )


def _run_out(
    config: BenchConfig,
    setup: RateSetup,
    spec: PolicySpec,
    described: dict[str, Any],
    report: GoodputReport,
    result: SimResult,
    wall: float,
    first_arrival: float,
) -> RunOut:
    st = result.stats
    per_class = {c: ClassOut(**{k: v for k, v in r.items() if k != "slo_class"}) for c, r in report.to_dict()[
        "per_class"
    ].items()}
    delivered = sum(delivered_tokens(o, config.decode_weight) for o in result.outcomes)
    return RunOut(
        policy=spec.label,
        policy_name=spec.name,
        estimator=spec.estimator,
        params=dict(spec.params),
        rps=round(setup.rps, 6),
        requests=len(setup.workload),
        arrivals=len({w.job_id or w.id for w in setup.workload}),
        window_s=setup.window_s,
        token_goodput=report.token_goodput,
        request_goodput=report.request_goodput,
        raw_throughput=window_throughput(result, first_arrival + setup.window_s, config.decode_weight),
        delivered_throughput=delivered / setup.window_s,
        per_class=per_class,
        preemptions=st.preemptions,
        preemptions_recompute=st.preempt_recompute,
        preemptions_swap=st.preempt_swap,
        engine_preemptions=st.engine_preemptions,
        recomputed_tokens=st.recomputed_tokens,
        rejections=st.rejections,
        demotions=st.demotions,
        decision_time=_decision_out(st.decision_s),
        steps=st.steps,
        sim_end_s=st.end_s,
        truncated=st.truncated,
        wall_s=round(wall, 3),
        policy_config={k: v for k, v in described.items() if isinstance(v, str | int | float | bool | list)},
    )


def summarize_rate(runs: Sequence[RunOut], saturation: float | None) -> RateSummary:
    by = {r.policy: r for r in runs}
    rps = runs[0].rps

    def good(label: str) -> float | None:
        run = by.get(label)
        return run.token_goodput if run is not None else None

    baselines = [by[b] for b in BASELINES if b in by and b != "fcfs"] + ([by["fcfs"]] if "fcfs" in by else [])
    best = max(baselines, key=lambda r: r.token_goodput, default=None)
    tempo, fcfs, oracle = good("tempo"), good("fcfs"), good("oracle")

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or b <= 0 else a / b

    ablations = {
        r.policy: r.token_goodput / tempo
        for r in runs
        if tempo and r.policy != "tempo" and (r.policy_name.startswith("tempo") or r.policy.startswith("tempo"))
    }
    return RateSummary(
        rps=rps,
        load_factor=None if not saturation else round(rps / saturation, 3),
        fcfs=fcfs,
        best_baseline=best.policy if best else None,
        best_baseline_goodput=best.token_goodput if best else None,
        tempo=tempo,
        oracle=oracle,
        tempo_vs_fcfs=ratio(tempo, fcfs),
        tempo_vs_best_baseline=ratio(tempo, best.token_goodput if best else None),
        tempo_vs_oracle=ratio(tempo, oracle),
        throughput_vs_fcfs=ratio(
            by["tempo"].raw_throughput if "tempo" in by else None, by["fcfs"].raw_throughput if "fcfs" in by else None
        ),
        ablations=ablations,
    )


def run_bench(
    config: BenchConfig,
    *,
    saturation_rps: float | None = None,
    on_setup: Callable[[RateSetup], None] | None = None,
    on_run: Callable[[RunOut], None] | None = None,
    progress: Callable[[str, float], None] | None = None,
) -> BenchOut:
    """Every policy at every rate; ``progress(label, fraction)`` as each simulation advances."""
    profile = load_profile(config.profile)
    rates: list[float | None] = list(config.rps) if config.workload is None else [None]
    if not rates:
        raise TempoError("give --rps (one or more rates) or --workload")
    runs: list[RunOut] = []
    summaries: list[RateSummary] = []
    estimators: dict[str, dict[str, Any]] = {}
    for rps in rates:
        setup = setup_rate(config, rps)
        if on_setup is not None:
            on_setup(setup)
        rate_runs = []
        for spec in config.policies:
            key = f"{spec.label} @ {setup.rps:g} rps"
            callback = None if progress is None else (lambda f, key=key: progress(key, f))
            run, _ = run_one(config, setup, spec, profile, callback)
            rate_runs.append(run)
            if on_run is not None:
                on_run(run)
        runs.extend(rate_runs)
        summaries.append(summarize_rate(rate_runs, saturation_rps))
        estimators.update(setup.estimators)
    return BenchOut(
        config=config_dict(config),
        profile={"name": profile.name, "description": profile.description, "engine": profile.to_dict()["engine"],
                 "fit": profile.fit},
        saturation_rps=saturation_rps,
        estimators=estimators,
        runs=runs,
        summary=summaries,
        environment={"python": platform.python_version(), "machine": platform.machine(), "numpy": np.__version__},
    )


def config_dict(config: BenchConfig) -> dict[str, Any]:
    return {
        "policies": [p.label for p in config.policies],
        "profile": config.profile,
        "rps": list(config.rps),
        "workload": str(config.workload) if config.workload else None,
        "duration_s": config.duration_s,
        "mix": config.mix,
        "arrivals": config.arrivals,
        "seed": config.seed,
        "tiers": list(config.tiers),
        "model": config.model,
        "quantile": config.quantile,
        "decode_weight": config.decode_weight,
        "step_noise": config.step_noise,
        "charge_decisions": config.charge_decisions,
        "training_size": config.training_size,
        "prompt_split": config.prompt_split,
    }


# -------------------------------------------------------------- capacity
def find_capacity(config: BenchConfig, probe_rps: float = 8.0) -> dict[str, float]:
    """FCFS saturation rate: the token throughput FCFS sustains when heavily overloaded (after the first
    third of the window, to skip the ramp-up) over the mean tokens (prompt + output) per arrival."""
    profile = load_profile(config.profile)
    setup = setup_rate(config, probe_rps)
    spec = PolicySpec("fcfs")
    _, result = run_one(config, setup, spec, profile)
    start = setup.window_s / 3
    tokens = 0.0
    for o in result.outcomes:
        times = o.token_times_s
        if times and start < times[0] <= setup.window_s:
            tokens += o.prompt_tokens
        tokens += sum(1 for t in times if start < t <= setup.window_s)
    sustained = tokens / (setup.window_s - start)
    per_arrival = sum(w.prompt_tokens + w.output_tokens for w in setup.workload) / max(
        1, len({w.job_id or w.id for w in setup.workload})
    )
    return {
        "probe_rps": probe_rps,
        "sustained_tokens_per_s": sustained,
        "tokens_per_arrival": per_arrival,
        "saturation_rps": sustained / per_arrival,
    }
