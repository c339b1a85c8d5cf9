"""Goodput accounting on hand-computed cases (DESIGN section 1)."""

import pytest
from tempo.scheduler.goodput import RequestOutcome, account, job_met, latency_good_tokens, request_met
from tempo.scheduler.slo import SLO, SLOClass


def latency(times, prompt=10, arrival=0.0, finished=True, rid="l"):
    return RequestOutcome(rid, SLO.latency(ttft_s=1.0, tbt_s=0.5), arrival, prompt, tuple(times), finished)


def test_latency_tokens_count_against_the_cumulative_schedule() -> None:
    # due times 1.0, 1.5, 2.0, 2.5: token 2 (2.1) is late, token 3 (2.4) is back on schedule
    outcome = latency([0.5, 1.4, 2.1, 2.4])
    assert latency_good_tokens(outcome) == 10 + 3
    assert latency_good_tokens(outcome, decode_weight=8) == 10 + 8 * 3
    assert not request_met(outcome)


def test_latency_fast_start_banks_slack() -> None:
    # token 3 due at 2.5; a burst early then a long pause still meets every due time
    outcome = latency([0.1, 0.2, 0.3, 2.5])
    assert latency_good_tokens(outcome) == 14
    assert request_met(outcome)


def test_latency_late_first_token_loses_the_prompt() -> None:
    outcome = latency([1.2, 1.3])
    assert latency_good_tokens(outcome) == 1  # token 1 due 1.5 is on time, prompt lost
    assert not request_met(outcome)


def test_unfinished_latency_request_keeps_its_on_time_tokens_but_misses() -> None:
    outcome = latency([0.5, 1.0], finished=False)
    assert latency_good_tokens(outcome) == 12
    assert not request_met(outcome)


@pytest.mark.parametrize(("finish", "met"), [(5.9, True), (6.0, True), (6.1, False)])
def test_deadline_is_all_or_nothing(finish: float, met: bool) -> None:
    outcome = RequestOutcome("d", SLO.deadline(5.0), 1.0, 20, (2.0, 3.0, 4.0, finish), True)
    assert request_met(outcome) is met
    report = account([outcome], duration_s=10.0)
    assert report.good_tokens == (24 if met else 0)
    assert report.delivered_tokens == 24
    assert report.token_goodput == pytest.approx(2.4 if met else 0.0)
    assert report.per_class[SLOClass.DEADLINE].attainment == (1.0 if met else 0.0)


def test_unfinished_deadline_request_earns_nothing() -> None:
    outcome = RequestOutcome("d", SLO.deadline(5.0), 0.0, 20, (1.0, 2.0), False)
    assert not request_met(outcome)
    assert account([outcome]).good_tokens == 0


def compound_call(rid, arrival, times, finished=True, job_arrival=0.0, prompt=100):
    return RequestOutcome(rid, SLO.compound(10.0), arrival, prompt, tuple(times), finished, "job", job_arrival)


def test_compound_job_counts_every_call_when_the_last_finishes_in_time() -> None:
    calls = [compound_call("a", 0.0, [1.0, 3.0]), compound_call("b", 3.0, [4.0, 5.0, 9.5])]
    assert job_met(calls)
    report = account(calls, duration_s=10.0)
    assert report.good_tokens == 100 + 2 + 100 + 3
    compound = report.per_class[SLOClass.COMPOUND]
    assert (compound.units, compound.met, compound.attainment) == (1, 1, 1.0)
    assert compound.e2e_s.p50 == pytest.approx(9.5)  # job arrival to the job's last token
    assert report.request_goodput == pytest.approx(0.1)


def test_compound_job_with_a_late_or_unreleased_call_earns_nothing() -> None:
    late = [compound_call("a", 0.0, [1.0, 3.0]), compound_call("b", 3.0, [4.0, 10.5])]
    unreleased = [compound_call("a", 0.0, [1.0, 3.0]), compound_call("b", 0.0, [], finished=False)]
    for calls in (late, unreleased):
        assert not job_met(calls)
        assert account(calls).good_tokens == 0


def test_best_effort_never_counts_but_its_throughput_is_reported() -> None:
    outcome = RequestOutcome("b", SLO.best_effort(), 0.0, 5, (1.0, 2.0), True)
    report = account([outcome], duration_s=2.0)
    best = report.per_class[SLOClass.BEST_EFFORT]
    assert best.good_tokens == 0 and best.delivered_tokens == 7 and best.attainment is None
    assert report.raw_throughput == pytest.approx(3.5)
    assert report.units == 0 and report.request_goodput == 0


def test_mixed_report_totals_and_percentiles() -> None:
    outcomes = [
        latency([0.5, 1.0, 1.5], rid="l1"),  # all on time: 10 + 3
        RequestOutcome("d1", SLO.deadline(5.0), 0.0, 20, (2.0, 4.0), True),  # met: 22
        RequestOutcome("d2", SLO.deadline(1.0), 0.0, 20, (2.0, 4.0), True),  # missed
    ]
    report = account(outcomes)
    assert report.duration_s == 4.0
    assert report.good_tokens == 13 + 22
    assert report.units == 3 and report.met == 2
    assert report.request_goodput == pytest.approx(0.5)
    assert report.per_class[SLOClass.LATENCY].ttft_s.p50 == 0.5
    assert report.per_class[SLOClass.LATENCY].tbt_s.p99 == pytest.approx(0.5)
    data = report.to_dict()
    assert data["per_class"]["deadline"]["attainment"] == 0.5


def test_invalid_outcomes_are_rejected() -> None:
    with pytest.raises(ValueError, match="non-decreasing"):
        latency([1.0, 0.5])
    with pytest.raises(ValueError, match="before the request arrived"):
        latency([0.5], arrival=1.0)
    with pytest.raises(ValueError, match="job_id"):
        RequestOutcome("c", SLO.compound(5.0), 0.0, 1, (1.0,), True)
    with pytest.raises(ValueError, match="duplicate"):
        account([latency([0.5]), latency([0.6])])


def test_slo_fields_are_checked_and_scaled() -> None:
    with pytest.raises(ValueError, match="deadline_s"):
        SLO(SLOClass.DEADLINE)
    with pytest.raises(ValueError, match="does not apply"):
        SLO(SLOClass.BEST_EFFORT, deadline_s=3.0)
    assert SLO.latency(2.0, 0.1).scaled(3) == SLO.latency(6.0, 0.30000000000000004)
    with pytest.raises(ValueError, match="unknown SLO class"):
        SLOClass.parse("interactive")
