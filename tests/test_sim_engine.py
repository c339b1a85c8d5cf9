"""Engine simulator sanity: exact modelled times, token conservation, compound release, KV pressure."""

from __future__ import annotations

import numpy as np
import pytest
from tempo.scheduler.registry import policy_names
from tempo.serving.profiles.profile import Profile
from tempo.serving.sim.simulator import PolicyError, Simulator
from tempo.serving.sim.testing import make_request, random_workload, simulate, small_profile


def expected_times(profile: Profile, prompt: int, output: int) -> list[float]:
    """Token times of one request alone, step by step from the profile (chunked prefill, then decodes)."""
    budget = profile.engine.token_budget
    t, done, times = 0.0, 0, []
    while done < prompt:
        chunk = min(budget, prompt - done)
        last = done + chunk == prompt
        t += profile.step_time(chunk, 0, 0, chunk * (done + (chunk + 1) / 2), done + chunk, sampled=int(last))
        done += chunk
    times.append(t)
    computed = prompt
    while len(times) < output:
        t += profile.step_time(0, 1, computed + 1, sampled=1)
        computed += 1
        times.append(t)
    return times


@pytest.mark.parametrize("policy", policy_names())
def test_one_request_alone_takes_exactly_its_modelled_time(policy: str) -> None:
    profile = small_profile(token_budget=256)
    workload = [make_request("a", "deadline", prompt_tokens=600, output_tokens=7, tier=4)]
    result = simulate(workload, policy, profile)
    (outcome,) = result.outcomes
    assert outcome.finished
    assert outcome.token_times_s == pytest.approx(expected_times(profile, 600, 7), rel=1e-12, abs=0)


def test_tokens_are_conserved_under_kv_pressure() -> None:
    rng = np.random.default_rng(3)
    workload = random_workload(rng, 40)
    profile = small_profile(kv_blocks=150, max_running=8, token_budget=128)
    result = simulate(workload, "fcfs", profile)
    true = {w.id: w.output_tokens for w in workload}
    assert len(result.outcomes) == len(workload)
    assert all(o.finished and o.output_tokens == true[o.request_id] for o in result.outcomes)
    st = result.stats
    assert st.preemptions > 0  # the small cache forces recompute preemptions
    computed = sum(w.prompt_tokens + w.output_tokens - 1 for w in workload)
    assert st.prefill_tokens + st.decode_tokens == computed + st.recomputed_tokens


def test_swap_preemption_moves_blocks_and_costs_time() -> None:
    rng = np.random.default_rng(5)
    workload = random_workload(rng, 40)
    swapping = small_profile(kv_blocks=150, max_running=8, token_budget=128, swap_blocks=400)
    result = simulate(workload, "tempo", swapping)
    st = result.stats
    assert st.preempt_swap > 0 and st.swapped_blocks > 0
    released = [o for o in result.outcomes if o.token_times_s or o.finished]
    rejected = set(result.rejected)
    for o in result.outcomes:
        if o.request_id not in rejected and o.token_times_s:
            assert o.finished
    assert released


def test_compound_stage_released_when_dependencies_finish() -> None:
    workload = [
        make_request("j.0.0", "compound", prompt_tokens=50, output_tokens=20, job_id="j", stage=0, tier=4),
        make_request("j.0.1", "compound", prompt_tokens=80, output_tokens=35, job_id="j", stage=0, tier=4),
        make_request("j.1.0", "compound", prompt_tokens=60, output_tokens=10, job_id="j", stage=1, tier=4,
                     depends_on=["j.0.0", "j.0.1"]),
    ]
    result = simulate(workload, "fcfs", small_profile())
    by_id = {o.request_id: o for o in result.outcomes}
    stage0_end = max(by_id["j.0.0"].token_times_s[-1], by_id["j.0.1"].token_times_s[-1])
    last = by_id["j.1.0"]
    assert last.arrival_s == pytest.approx(stage0_end)
    assert last.job_arrival_s == 0.0 and last.token_times_s[0] > stage0_end
    assert all(o.finished for o in result.outcomes)


def test_same_inputs_same_run() -> None:
    workload = random_workload(np.random.default_rng(11), 30)
    profile = small_profile(kv_blocks=200, max_running=8)
    first = simulate(workload, "tempo", profile)
    second = simulate(workload, "tempo", profile)
    assert [o.token_times_s for o in first.outcomes] == [o.token_times_s for o in second.outcomes]
    assert first.rejected == second.rejected and first.stats.steps == second.stats.steps


def test_step_noise_comes_from_the_injected_generator() -> None:
    workload = random_workload(np.random.default_rng(2), 10)
    profile = small_profile()

    def run(seed: int) -> list[tuple[float, ...]]:
        from tempo.scheduler.registry import make_policy
        from tempo.serving.sim.testing import noisy_ladders

        ladders = noisy_ladders(workload, np.random.default_rng(0))
        sim = Simulator(workload, ladders, make_policy("fcfs"), profile, rng=np.random.default_rng(seed),
                        step_noise=0.1)
        return [o.token_times_s for o in sim.run().outcomes]

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_a_policy_that_never_schedules_is_caught() -> None:
    from tempo.scheduler.interface import Decision, Policy, Snapshot

    class Idle(Policy):
        name = "idle"

        def decide(self, snapshot: Snapshot) -> Decision:
            return Decision.empty()

    workload = [make_request("a")]
    sim = Simulator(workload, {"a": __import__("tempo.scheduler.bounds", fromlist=["x"]).BoundLadder.fixed(10)},
                    Idle(), small_profile())
    with pytest.raises(PolicyError, match="schedules none"):
        sim.run()


def test_snapshot_states_match_their_fields() -> None:
    """The engine builds RequestState positionally for speed: it must agree with the named fields."""
    from tempo.scheduler.bounds import BoundLadder
    from tempo.scheduler.interface import RequestState
    from tempo.scheduler.registry import make_policy

    workload = [make_request("j.0.0", "compound", prompt_tokens=40, output_tokens=5, job_id="j", stage=0)]
    sim = Simulator(workload, {"j.0.0": BoundLadder.fixed(9)}, make_policy("fcfs"), small_profile())
    sim.run()
    req = sim.requests[0]
    req.state = None
    state = sim._state(req)
    named = RequestState(
        request_id="j.0.0", slo=req.slo, arrival_s=0.0, prompt_tokens=40, ladder=BoundLadder.fixed(9),
        phase=req.phase, generated=5, computed_tokens=44, kv_blocks=0, app="test", first_token_s=req.first_s,
        per_token_s=(req.times[-1] - req.first_s) / 4, priority=0, max_tokens=None, job=state.job, demoted=False,
        preemptions=0,
    )
    assert state == named and state.job is not None and state.job.job_id == "j" and state.job.done_tokens == 45


def test_swap_traffic_is_charged_once_for_out_and_once_for_in() -> None:
    """A policy swaps a request out mid-decode; its blocks cross PCIe exactly twice (out, then back in)."""
    from dataclasses import replace

    from tempo.scheduler.bounds import BoundLadder
    from tempo.scheduler.interface import Decision, Phase, Policy, Preemption, PreemptMode, Snapshot

    moved: list[int] = []

    class Recording(type(small_profile())):  # type: ignore[misc]
        def step_time(self, *args: object, **kwargs: object) -> float:
            blocks = kwargs.get("swap_blocks", args[6] if len(args) > 6 else 0)
            moved.append(int(blocks))  # type: ignore[arg-type]
            return super().step_time(*args, **kwargs)  # type: ignore[arg-type]

    class SwapOnce(Policy):
        name = "swap-once"
        frame_steps = 1
        done = False

        def decide(self, snapshot: Snapshot) -> Decision:
            ids = tuple(r.request_id for r in snapshot.requests)
            a = next((r for r in snapshot.requests if r.request_id == "a"), None)
            if not self.done and a is not None and a.phase is Phase.RUNNING and a.generated >= 3:
                self.done = True
                return Decision(run=tuple(i for i in ids if i != "a"), preempt=(Preemption("a", PreemptMode.SWAP),))
            return Decision(run=ids)

    base = small_profile(swap_blocks=100)
    profile = Recording(**{f: getattr(base, f) for f in ("name", "description", "arch", "hw", "engine", "knots",
                                                          "linear_s", "fit")})
    workload = [make_request("a", prompt_tokens=100, output_tokens=10), make_request("b", output_tokens=30)]
    ladders = {w.id: BoundLadder.fixed(50) for w in workload}
    result = Simulator(workload, ladders, SwapOnce(), replace(profile), check_decisions=True).run()
    assert all(o.finished for o in result.outcomes)
    assert result.stats.preempt_swap == 1
    blocks = result.stats.swapped_blocks
    assert blocks == 7  # 103 tokens of KV in 16-token blocks
    assert sorted(b for b in moved if b) == [blocks, blocks]


def test_charged_decisions_cost_simulated_time() -> None:
    import time

    from tempo.scheduler.bounds import BoundLadder
    from tempo.scheduler.interface import Decision, Policy, Snapshot

    class Slow(Policy):
        """Runs everything, after 5 ms of thought per decision."""

        name = "slow"

        def decide(self, snapshot: Snapshot) -> Decision:
            time.sleep(0.005)
            return Decision(run=tuple(r.request_id for r in snapshot.requests))

    workload = [make_request("a", "deadline", prompt_tokens=64, output_tokens=20, tier=4)]
    ladders = {"a": BoundLadder.fixed(20)}
    free = Simulator(workload, ladders, Slow(), small_profile()).run()
    charged = Simulator(workload, ladders, Slow(), small_profile(), charge_decisions=True).run()
    decisions = charged.stats.decisions
    assert decisions >= 20 and free.stats.decisions == decisions
    extra = charged.stats.end_s - free.stats.end_s
    assert extra >= decisions * 0.005 and extra == pytest.approx(sum(charged.stats.decision_s), rel=0.5)
