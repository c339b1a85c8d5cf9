"""The small pure pieces policies compose: packing into capacity, victims, deadlines, GMAX, job outlooks."""

from __future__ import annotations

import pytest
from tempo.scheduler.interface import Decision, JobInfo, Phase, Preemption, PreemptMode, check_decision, victim_order
from tempo.scheduler.jobs import JobProfile, OracleTruth, outlook_of, quantile_up
from tempo.scheduler.planning import WATERMARK_FRACTION, blocks_for, cheaper_mode, kv_need, pack, slo_deadline
from tempo.scheduler.slo import SLOClass
from tempo.scheduler.tempo_policy import gmax_order
from tempo.scheduler.testing import make_limits, make_snapshot, make_state


def test_blocks_and_kv_need() -> None:
    assert blocks_for(0, 16) == 0 and blocks_for(1, 16) == 1 and blocks_for(16, 16) == 1 and blocks_for(17, 16) == 2
    waiting = make_state("w", prompt_tokens=31)
    assert kv_need(waiting, 16) == 2  # prompt + its first token
    resident = make_state("r", prompt_tokens=31, generated=3, phase=Phase.RUNNING)
    assert kv_need(resident, 16) == 0
    swapped = resident._replace(phase=Phase.SWAPPED)
    assert kv_need(swapped, 16) == swapped.kv_blocks > 0


def test_pack_respects_slots_and_kv_in_order() -> None:
    states = [make_state(f"w{i}", prompt_tokens=100, arrival_s=i) for i in range(5)]  # 7 blocks each
    limits = make_limits(max_running=3, kv_blocks_total=1000)
    assert [r.request_id for r in pack(states, limits).run] == ["w0", "w1", "w2"]
    tight = make_limits(max_running=10, kv_blocks_total=20)  # 20 free, watermark 0
    assert [r.request_id for r in pack(states, tight).run] == ["w0", "w1"]


def test_pack_head_of_line_blocking_stops_at_the_first_misfit() -> None:
    big = make_state("big", prompt_tokens=500, arrival_s=0)
    small = make_state("small", prompt_tokens=10, arrival_s=1)
    limits = make_limits(kv_blocks_total=20)
    assert [r.request_id for r in pack([big, small], limits).run] == ["small"]
    assert pack([big, small], limits, stop_at_blocked=True).run == ()


def test_pack_evicts_lower_ranked_residents_only_when_allowed() -> None:
    low = make_state("low", prompt_tokens=150, generated=2, phase=Phase.RUNNING)  # 10 blocks
    new = make_state("new", prompt_tokens=150)  # needs 10 blocks
    limits = make_limits(kv_blocks_total=15, kv_blocks_free=5)
    no = pack([new, low], limits)
    assert [r.request_id for r in no.run] == ["low"] and no.evict == ()
    yes = pack([new, low], limits, preempt=True)
    assert [r.request_id for r in yes.run] == ["new"] and [r.request_id for r in yes.evict] == ["low"]
    refused = pack([new, low], limits, preempt=True, can_evict=lambda victim, newcomer: False)
    assert refused.evict == () and [r.request_id for r in refused.run] == ["low"]
    higher = pack([low, new], limits, preempt=True)  # a resident ranked above the newcomer is never evicted
    assert higher.evict == ()


def test_pack_evicts_unwanted_residents_first_and_all_or_nothing() -> None:
    unwanted = make_state("be", SLOClass.BEST_EFFORT, prompt_tokens=60, generated=2, phase=Phase.RUNNING)  # 4
    ranked = make_state("low", prompt_tokens=150, generated=2, phase=Phase.RUNNING)  # 10 blocks
    new = make_state("new", prompt_tokens=150)  # 10 blocks
    limits = make_limits(kv_blocks_total=16, kv_blocks_free=2)
    out = pack([new, ranked], limits, preempt=True, others=[unwanted])
    assert [r.request_id for r in out.evict] == ["be", "low"]
    # if the unwanted resident alone cannot make room and the ranked one may not go, nothing is evicted
    picky = pack([new, ranked], limits, preempt=True, others=[unwanted], can_evict=lambda v, n: v.request_id == "be")
    assert picky.evict == ()


def test_watermark_is_kept_for_admissions() -> None:
    limits = make_limits(kv_blocks_total=1000, kv_blocks_free=12)  # watermark 10
    assert int(1000 * WATERMARK_FRACTION) == 10
    assert pack([make_state("w", prompt_tokens=40)], limits).run == ()  # 3 blocks > 12 - 10


def test_victim_order_takes_paused_residents_first_then_the_tail() -> None:
    assert victim_order(["a", "b", "c"], ["a", "b", "c", "p1", "p2"]) == ["p2", "p1", "c", "b", "a"]
    assert victim_order(["a", "x"], ["a"]) == ["a"]


def test_slo_deadlines() -> None:
    lat = make_state("l", SLOClass.LATENCY, arrival_s=10, generated=5)
    assert slo_deadline(lat) == pytest.approx(10 + 2.0 + 5 * 0.1)
    assert slo_deadline(make_state("d", SLOClass.DEADLINE, arrival_s=10, tier=2)) == pytest.approx(50.0)
    job = JobInfo("j", 1, job_arrival_s=3.0)
    assert slo_deadline(make_state("c", SLOClass.COMPOUND, arrival_s=10, job=job)) == pytest.approx(43.0)
    assert slo_deadline(make_state("b", SLOClass.BEST_EFFORT)) == float("inf")
    assert slo_deadline(make_state("x", SLOClass.DEADLINE, demoted=True)) == float("inf")


def test_cheaper_mode_prefers_swap_when_it_is_cheaper_and_possible() -> None:
    state = make_state("r", prompt_tokens=1600, generated=10, phase=Phase.RUNNING)  # 101 blocks
    no_swap = make_limits(swap_blocks_free=0)
    assert cheaper_mode(state, no_swap, 1e-4, 7e-5)[0] is PreemptMode.RECOMPUTE
    swap = make_limits(swap_blocks_free=500)
    mode, cost = cheaper_mode(state, swap, 1e-4, 7e-5)
    assert mode is PreemptMode.SWAP and cost == pytest.approx(2 * 101 * 1e-4)
    assert cheaper_mode(state, swap, 1.0, 7e-5)[0] is PreemptMode.RECOMPUTE  # a very slow link


def test_gmax_picks_the_length_window_with_the_largest_total_priority() -> None:
    # every candidate is within the band; by length the windows of 3 are [1,2,3] = 29.1, [2,3,4] = 28.3 and
    # [3,4,0] = 28.6: the similar-length group wins, so the top-priority outlier (length 5000) waits
    priority = [10.0, 9.8, 9.7, 9.6, 9.0]
    length = [5000, 100, 101, 102, 103]
    assert gmax_order([0, 1, 2, 3, 4], priority, length, batch=3, p=1.5) == [1, 2, 3, 0, 4]
    # with a narrow band (priority >= 9.7 / 1.01) only the top three qualify: plain priority order
    assert gmax_order([0, 1, 2, 3, 4], priority, length, batch=3, p=1.01) == [0, 1, 2, 3, 4]


def test_gmax_with_p_one_is_plain_priority_order() -> None:
    priority = [5.0, 4.0, 3.0, 2.0]
    assert gmax_order([0, 1, 2, 3], priority, [9, 1, 5, 2], batch=2, p=1.0) == [0, 1, 2, 3]
    assert gmax_order([0, 1], priority, [9, 1], batch=4, p=2.0) == [0, 1]


def test_job_profile_quantiles_and_oracle_truth() -> None:
    graphs = [
        ("dr", [[(100, 10)], [(200, 50), (300, 80)], [(400, 20)]]),
        ("dr", [[(100, 12)], [(250, 30)]]),
    ]
    profile = JobProfile.fit(graphs, quantile=0.9)
    after0 = profile.outlook("dr", 0)
    assert after0.stages_after == 2 and after0.decode_tokens_after == 80 + 20 and after0.samples == 2
    assert after0.prefill_tokens_after == 300 + 400
    assert profile.outlook("dr", 2).stages_after == 0
    assert profile.outlook("unknown", 0).samples == 0
    assert quantile_up([1, 2, 3, 4], 0.5) == 2 and quantile_up([1, 2, 3, 4], 0.9) == 4
    exact = outlook_of(graphs[0][1], 1)
    assert exact.stages_after == 1 and exact.tokens_after == 420
    truth = OracleTruth({}, {"j": tuple(tuple(s) for s in graphs[1][1])})
    assert truth.outlook("j", 0).decode_tokens_after == 30 and truth.outlook("nope", 0).samples == 0
    with pytest.raises(ValueError):
        JobProfile.fit(graphs, quantile=1.0)


def test_check_decision_catches_contract_breaches() -> None:
    resident = make_state("r", phase=Phase.RUNNING, generated=2)
    waiting = make_state("w")
    snapshot = make_snapshot([resident, waiting])
    assert check_decision(snapshot, Decision(run=("r", "w"))).ok
    bad = [
        Decision(run=("r", "r")),
        Decision(run=("ghost",)),
        Decision(preempt=(Preemption("w"),)),  # not resident
        Decision(preempt=(Preemption("r", PreemptMode.SWAP),)),  # no swap space
        Decision(run=("w",), reject=("w",)),
        Decision(run=("r",), preempt=(Preemption("r"),)),
        Decision(token_budget=0),
    ]
    for decision in bad:
        assert not check_decision(snapshot, decision).ok, decision


def test_pack_stops_looking_for_newcomers_after_max_misfits_but_keeps_residents() -> None:
    resident = make_state("res", prompt_tokens=32, generated=2, phase=Phase.RUNNING)
    big = [make_state(f"big{i}", prompt_tokens=400, arrival_s=i) for i in range(5)]  # 26 blocks each
    tiny = make_state("tiny", prompt_tokens=10, arrival_s=9)  # 1 block
    limits = make_limits(kv_blocks_total=20, kv_blocks_free=10)
    ordered = [*big, tiny, resident]
    assert [r.request_id for r in pack(ordered, limits).run] == ["tiny", "res"]
    assert [r.request_id for r in pack(ordered, limits, max_misfits=3).run] == ["res"]
