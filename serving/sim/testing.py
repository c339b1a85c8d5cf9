"""Factories for simulator tests: synthetic workload requests (no data files) and small engine profiles."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tempo.scheduler.bounds import BoundLadder
from tempo.scheduler.registry import PolicyContext, make_policy, needs_truth
from tempo.scheduler.slo import SLOClass
from tempo.serving.bench.benchmark import build_truth
from tempo.serving.profiles.profile import DEFAULT_PROFILE, Profile, load_profile
from tempo.serving.sim.simulator import SimResult, Simulator
from tempo.serving.workloads.format import WorkloadRequest


def make_request(
    request_id: str,
    slo_class: SLOClass | str = SLOClass.LATENCY,
    *,
    arrival_s: float = 0.0,
    prompt_tokens: int = 100,
    output_tokens: int = 50,
    tier: int = 1,
    job_id: str | None = None,
    stage: int | None = None,
    depends_on: Sequence[str] = (),
    app: str = "test",
) -> WorkloadRequest:
    cls = SLOClass(slo_class)
    fields: dict[str, float] = {}
    if cls is SLOClass.LATENCY:
        fields = {"ttft_slo_s": 2.0 * tier, "tbt_slo_s": 0.1 * tier}
    elif cls is SLOClass.DEADLINE:
        fields = {"deadline_s": 20.0 * tier}
    elif cls is SLOClass.COMPOUND:
        fields = {"job_deadline_s": 40.0 * tier}
    return WorkloadRequest.model_validate({
        "id": request_id,
        "arrival_s": arrival_s,
        "slo_class": cls,
        "slo_tier": tier,
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "app": app,
        "job_id": job_id if cls is SLOClass.COMPOUND else None,
        "stage": (stage or 0) if cls is SLOClass.COMPOUND else None,
        "depends_on": list(depends_on),
        **fields,
    })


def random_workload(rng: np.random.Generator, n: int, span_s: float = 20.0) -> list[WorkloadRequest]:
    """A mixed workload of ``n`` arrivals (compound jobs of 1-3 stages with fan-out up to 3)."""
    requests: list[WorkloadRequest] = []
    classes = [SLOClass.LATENCY, SLOClass.DEADLINE, SLOClass.COMPOUND, SLOClass.BEST_EFFORT]
    for i, arrival in enumerate(np.sort(rng.uniform(0, span_s, n))):
        cls = classes[int(rng.integers(len(classes)))]
        tier = int(rng.integers(1, 5))
        arrival = round(float(arrival), 6)
        if cls is SLOClass.COMPOUND:
            previous: list[str] = []
            for stage in range(int(rng.integers(1, 4))):
                ids = [f"j{i}.{stage}.{k}" for k in range(int(rng.integers(1, 4)))]
                for call in ids:
                    requests.append(
                        make_request(call, cls, arrival_s=arrival, prompt_tokens=int(rng.integers(20, 1500)),
                                     output_tokens=int(rng.integers(1, 200)), tier=tier, job_id=f"j{i}",
                                     stage=stage, depends_on=previous, app="agent")
                    )
                previous = ids
            continue
        requests.append(
            make_request(f"r{i}", cls, arrival_s=arrival, prompt_tokens=int(rng.integers(1, 2000)),
                         output_tokens=int(rng.integers(1, 400)), tier=tier)
        )
    return requests


def small_profile(
    kv_blocks: int = 400, max_running: int = 16, token_budget: int = 256, swap_blocks: int = 0
) -> Profile:
    """The default profile with a small engine, so that queues, KV pressure and preemption happen fast."""
    return load_profile(DEFAULT_PROFILE).with_engine(
        kv_blocks=kv_blocks, max_running=max_running, token_budget=token_budget, swap_blocks=swap_blocks
    )


def noisy_ladders(workload: Sequence[WorkloadRequest], rng: np.random.Generator) -> dict[str, BoundLadder]:
    """Bounds that are sometimes above and sometimes below the truth (policies must cope with both)."""
    ladders = {}
    for w in workload:
        b0 = max(1, int(w.output_tokens * float(rng.uniform(0.5, 2.0))))
        ladders[w.id] = BoundLadder(((0, b0), (b0, 2 * b0 + 1)))
    return ladders


def simulate(
    workload: Sequence[WorkloadRequest],
    policy_name: str,
    profile: Profile,
    ladders: dict[str, BoundLadder] | None = None,
    *,
    check: bool = True,
    seed: int = 0,
    **params: object,
) -> SimResult:
    """Run one policy on a workload with every check on."""
    truth = build_truth(workload) if needs_truth(policy_name) else None
    policy = make_policy(policy_name, PolicyContext(truth=truth), **params)
    if ladders is None:
        ladders = {w.id: BoundLadder.fixed(max(1, 2 * w.output_tokens)) for w in workload}
    sim = Simulator(workload, ladders, policy, profile, rng=np.random.default_rng(seed), check_decisions=check)
    return sim.run()
