"""Tempo's own behaviour: admission (reject / demote), pacing, the prefill budget, preemption economics,
the oracle's knowledge, and the ablation switches."""

from __future__ import annotations

import pytest
from tempo.scheduler.bounds import BoundLadder
from tempo.scheduler.interface import JobInfo, Phase, PreemptMode
from tempo.scheduler.jobs import JobProfile, OracleTruth
from tempo.scheduler.registry import PolicyContext, make_policy
from tempo.scheduler.slo import SLOClass
from tempo.scheduler.tempo_policy import OracleTempo, TempoPolicy
from tempo.scheduler.testing import make_limits, make_snapshot, make_state, make_timing


def tempo(**params: object) -> TempoPolicy:
    policy = make_policy("tempo", **params)
    assert isinstance(policy, TempoPolicy)
    return policy


def test_rejects_all_or_nothing_requests_past_their_deadline() -> None:
    late_deadline = make_state("d", SLOClass.DEADLINE, arrival_s=0.0)  # deadline 20 s
    late_job = make_state("c", SLOClass.COMPOUND, arrival_s=0.0)  # job deadline 40 s
    chat = make_state("l", SLOClass.LATENCY, arrival_s=49.0)
    decision = tempo().decide(make_snapshot([late_deadline, late_job, chat], now_s=50.0))
    assert set(decision.reject) == {"d", "c"}
    assert decision.run == ("l",)


def test_demotes_what_can_no_longer_make_it_but_still_serves_it_when_idle() -> None:
    # 20 s deadline, 19 s gone, a 1000-token bound at 30 ms a token: hopeless
    hopeless = make_state("d", SLOClass.DEADLINE, arrival_s=0.0, bound=1000)
    # a chat request whose every remaining token will be late (5 s behind, 10 tokens left at most)
    behind = make_state("l", SLOClass.LATENCY, arrival_s=0.0, generated=5, phase=Phase.RUNNING, bound=15)
    decision = tempo().decide(make_snapshot([hopeless, behind], now_s=19.0))
    assert set(decision.demote) == {"d", "l"} and not decision.reject
    assert set(decision.run) == {"d", "l"}  # nothing else wants the engine: best effort runs


def test_best_effort_waits_while_feasible_slo_work_does_not_fit() -> None:
    limits = make_limits(max_running=1, kv_blocks_total=30)
    slo = make_state("slo", SLOClass.DEADLINE, arrival_s=0.9, prompt_tokens=300, bound=50, tier=4)
    be = make_state("be", SLOClass.BEST_EFFORT, arrival_s=0.0, prompt_tokens=300)
    decision = tempo(pace=False).decide(make_snapshot([be, slo], now_s=1.0, limits=limits))
    assert decision.run == ("slo",)


def test_pace_is_the_minimum_bandwidth() -> None:
    chat = make_state("l", SLOClass.LATENCY, arrival_s=0.0, generated=10, phase=Phase.RUNNING, tier=2)
    job = make_state("d", SLOClass.DEADLINE, arrival_s=0.0, generated=10, phase=Phase.RUNNING, bound=110, tier=4)
    decision = tempo().decide(make_snapshot([chat, job], now_s=1.0))
    paces = {p.request_id: p for p in decision.pace}
    assert paces["l"].tokens_per_s == pytest.approx(1 / 0.2)  # one token per TBT
    # 100 tokens left, 79 s to the deadline: about 1.27 tokens/s is enough
    assert paces["d"].tokens_per_s == pytest.approx(100 / 79.0, rel=0.01)
    assert not tempo(pace=False).decide(make_snapshot([chat, job], now_s=1.0)).pace


def test_prefill_budget_shrinks_to_keep_a_tight_chat_request_on_pace() -> None:
    # token 10 is due at 3.0 s: 50 ms to spare, so steps must stay short
    chat = make_state("l", SLOClass.LATENCY, arrival_s=0.0, generated=10, phase=Phase.RUNNING, prompt_tokens=50)
    big = make_state("big", SLOClass.DEADLINE, arrival_s=2.9, prompt_tokens=8000, tier=4)
    snapshot = make_snapshot([chat, big], now_s=2.95, timing=make_timing(0.05))
    budget = tempo().decide(snapshot).token_budget
    assert budget is not None and 64 <= budget < 2048
    assert tempo(budget_control=False).decide(snapshot).token_budget is None


def test_preempts_only_when_the_gain_exceeds_the_loss() -> None:
    limits = make_limits(kv_blocks_total=40)
    squatter = make_state("be", SLOClass.BEST_EFFORT, prompt_tokens=400, generated=5, phase=Phase.RUNNING)
    newcomer = make_state("new", SLOClass.DEADLINE, arrival_s=0.9, prompt_tokens=400, bound=50, tier=2)
    decision = tempo().decide(make_snapshot([squatter, newcomer], now_s=1.0, limits=limits))
    assert [p.request_id for p in decision.preempt] == ["be"] and "new" in decision.run
    # a resident chat request of the same worth is not evicted for the newcomer
    peer = make_state("peer", SLOClass.DEADLINE, arrival_s=0.5, prompt_tokens=400, generated=5, bound=55,
                      phase=Phase.RUNNING, tier=2)
    decision = tempo().decide(make_snapshot([peer, newcomer], now_s=1.0, limits=limits))
    assert decision.preempt == () and decision.run == ("peer",)


def test_swap_is_the_default_preemption_mode_when_the_engine_can_swap() -> None:
    state = make_state("r", SLOClass.LATENCY, generated=2, phase=Phase.RUNNING)
    swap = make_limits(swap_blocks_free=100)
    decision = tempo().decide(make_snapshot([state], limits=swap, timing=make_timing(swap_s_per_block=1e-4)))
    assert decision.preempt_mode is PreemptMode.SWAP
    assert tempo().decide(make_snapshot([state])).preempt_mode is PreemptMode.RECOMPUTE


def test_the_bound_ladder_tightens_the_view_as_decoding_proceeds() -> None:
    ladder = BoundLadder(((0, 800), (200, 800), (600, 1000)))
    early = make_state("a", SLOClass.DEADLINE, bound=ladder, generated=10, phase=Phase.RUNNING, tier=4)
    later = early._replace(generated=300, computed_tokens=early.prompt_tokens + 299)
    pace_early = tempo().decide(make_snapshot([early], now_s=1.0)).pace[0].tokens_per_s
    pace_later = tempo().decide(make_snapshot([later], now_s=1.0)).pace[0].tokens_per_s
    assert pace_later < pace_early  # 200 left of 500 instead of 790 of 800


def test_oracle_sees_true_lengths_and_graphs_and_nothing_else_does() -> None:
    job = JobInfo("j", 0, 0.0)
    call = make_state("c", SLOClass.COMPOUND, bound=900, job=job, tier=4)
    truth = OracleTruth({"c": 40}, {"j": (((100, 40),), ((100, 30),))})
    oracle = make_policy("oracle", PolicyContext(truth=truth))
    assert isinstance(oracle, OracleTempo) and oracle.describe()["oracle"] is True
    assert not tempo().describe()["oracle"]
    pace_oracle = oracle.decide(make_snapshot([call], now_s=1.0)).pace[0].tokens_per_s
    pace_tempo = tempo().decide(make_snapshot([call], now_s=1.0)).pace[0].tokens_per_s
    assert pace_oracle < pace_tempo  # 40 true tokens instead of a 900-token bound


def test_compound_sub_deadline_leaves_room_for_later_stages() -> None:
    job = JobInfo("j", 0, 0.0)
    call = make_state("c", SLOClass.COMPOUND, bound=100, job=job, tier=4, generated=1, phase=Phase.RUNNING)
    alone = tempo().decide(make_snapshot([call], now_s=1.0)).pace[0].tokens_per_s
    profile = JobProfile.fit([("test", [[(100, 100)], [(100, 2000)], [(100, 2000)]])] * 5)
    policy = make_policy("tempo", PolicyContext(job_profile=profile))
    crowded = policy.decide(make_snapshot([call], now_s=1.0)).pace[0].tokens_per_s
    assert crowded > alone  # 4000 tokens still to come after this stage: this one must hurry


@pytest.mark.parametrize(("param", "value"), [("p", "0.5"), ("grouping", "random"), ("share", "0")])
def test_bad_parameters_are_refused(param: str, value: str) -> None:
    with pytest.raises(ValueError):
        make_policy("tempo", **{param: value})


def test_ablation_variants_are_registered_with_their_switches() -> None:
    assert make_policy("tempo-sjf").describe()["grouping"] == "sjf"
    described = make_policy("tempo-nopace").describe()
    assert described["pace"] is False and described["budget_control"] is False
    assert make_policy("tempo", p="2", pace="false").describe()["p"] == 2.0
