"""Scheduler cost: the time of one ``decide()`` with 100, 1,000 and 10,000 queued requests.

The snapshots are built from a real mixed workload (the benchmark's default): ``queued`` requests waiting
(arrived over the last 30 s, some of them partly prefilled or preempted), plus a full batch of
``max_running`` residents part-way through decoding, with the bound ladders of the empirical provider and
the default profile's engine limits. Each policy decides on the same snapshots; the timing is wall clock
around ``decide()`` only (what the simulator reports as decision time).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
from tempo.scheduler.interface import EngineLimits, JobInfo, Phase, RequestState, Snapshot
from tempo.scheduler.registry import PolicyContext, make_policy, needs_truth
from tempo.serving.bench.benchmark import BenchConfig, build_truth, fresh_store, ladders_for, setup_rate
from tempo.serving.profiles.profile import load_profile
from tempo.serving.sim.simulator import engine_timing
from tempo.serving.workloads.format import WorkloadRequest

DEFAULT_QUEUED = (100, 1_000, 10_000)
COST_POLICIES = ("fcfs", "priority", "edf", "sjf", "srtf", "autellix", "tempo", "oracle")


@dataclass(frozen=True)
class CostRow:
    policy: str
    queued: int
    running: int
    repeats: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    cold_ms: float  # the first decision, with nothing memoised


def _states(
    pool: Sequence[WorkloadRequest],
    ladders: dict[str, object],
    queued: int,
    running: int,
    now: float,
    block_size: int,
    rng: np.random.Generator,
    graphs: Mapping[str, tuple[tuple[tuple[int, int], ...], ...]] | None = None,
) -> list[RequestState]:
    """``graphs``: job id -> its true graph, for the finished stages a compound call's job shows."""
    picks = rng.choice(len(pool), size=queued + running, replace=len(pool) < queued + running)
    states: list[RequestState] = []
    for i, index in enumerate(picks):
        w = pool[int(index)]
        rid = f"{w.id}#{i}"
        resident = i < running
        arrival = now - float(rng.uniform(0, 30.0 if not resident else 60.0))
        generated = int(rng.integers(1, max(2, w.output_tokens))) if resident else 0
        computed = w.prompt_tokens + generated - 1 if resident else 0
        if not resident and rng.random() < 0.05:  # a preempted request: some output, no KV
            generated = int(rng.integers(1, max(2, w.output_tokens)))
        job = None
        if w.job_id is not None:
            stage = w.stage or 0
            graph = (graphs or {}).get(w.job_id, ())
            prompts = tuple(p for p, _ in graph[stage]) if stage < len(graph) else ()
            job = JobInfo(f"{w.job_id}#{i}", stage, arrival - float(rng.uniform(0, 60.0)), 1, 0, graph[:stage],
                          prompts)
        states.append(
            RequestState(
                rid, w.slo(), arrival, w.prompt_tokens, ladders[w.id],  # type: ignore[arg-type]
                Phase.RUNNING if resident else Phase.WAITING, generated, computed,
                -(-computed // block_size) if resident else 0, w.app, arrival + 1.0 if resident else None,
                0.05 if resident else None, 0, None, job, False, 0,
            )
        )
    resident_states = [s for s in states if s.phase is Phase.RUNNING]
    waiting = sorted((s for s in states if s.phase is not Phase.RUNNING), key=lambda s: (s.arrival_s, s.request_id))
    return [*resident_states, *waiting]


def reference_loop_ms(n: int = 1_000_000) -> float:
    """Milliseconds of a fixed pure-Python loop: a yardstick to compare decision times across machines."""
    t0 = time.perf_counter()
    total = 0
    for i in range(n):
        total += i
    return (time.perf_counter() - t0) * 1e3


def scheduler_cost(
    policies: Sequence[str] = COST_POLICIES,
    queued: Sequence[int] = DEFAULT_QUEUED,
    profile_name: str | None = None,
    seed: int = 0,
    repeats: int | None = None,
) -> list[CostRow]:
    config = BenchConfig(policies=[], duration_s=300.0, seed=seed, training_size=2000)
    if profile_name:
        config.profile = profile_name
    profile = load_profile(config.profile)
    setup = setup_rate(config, 4.0)
    ladders = ladders_for(setup, "empirical", config.quantile)
    truth_pool = build_truth(setup.workload)
    timing = engine_timing(profile)
    rng = np.random.default_rng(seed)
    running = profile.engine.max_running
    rows: list[CostRow] = []
    now = 1_000.0
    for n in queued:
        states = _states(setup.workload, dict(ladders), n, running, now, profile.engine.block_size, rng,
                         truth_pool.jobs)
        used = sum(s.kv_blocks for s in states)
        limits = EngineLimits(
            token_budget=profile.engine.token_budget,
            max_running=profile.engine.max_running,
            kv_blocks_total=profile.engine.kv_blocks,
            kv_blocks_free=max(0, profile.engine.kv_blocks - used),
            block_size=profile.engine.block_size,
            swap_blocks_free=profile.engine.swap_blocks,
        )
        snapshot = Snapshot(now, tuple(states), limits, replace(timing, recent_step_s=0.06), 1)
        reps = repeats or (30 if n >= 10_000 else 100)
        for name in policies:
            truth = None
            if needs_truth(name):
                lengths = {s.request_id: truth_pool.lengths[s.request_id.split("#")[0]] for s in states}
                truth = type(truth_pool)(lengths, {})
            policy = make_policy(name, PolicyContext(job_profile=setup.job_profile,
                                                     job_graphs=fresh_store(setup.job_graphs), truth=truth))
            t0 = time.perf_counter()
            policy.decide(snapshot)  # cold: nothing memoised yet
            cold = time.perf_counter() - t0
            samples = []
            for _ in range(reps):
                # as in the engine: residents' states are new every step, waiting ones are unchanged
                fresh = tuple(s._replace() if s.phase is Phase.RUNNING else s for s in snapshot.requests)
                current = replace(snapshot, requests=fresh)
                t0 = time.perf_counter()
                policy.decide(current)
                samples.append(time.perf_counter() - t0)
            arr = np.asarray(samples) * 1e3
            rows.append(
                CostRow(name, n, running, reps, float(np.percentile(arr, 50)), float(np.percentile(arr, 99)),
                        float(arr.mean()), cold * 1e3)
            )
    return rows
