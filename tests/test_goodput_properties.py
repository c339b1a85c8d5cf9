"""Invariants of the goodput accounting, checked with hypothesis."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st
from tempo.scheduler.goodput import RequestOutcome, account
from tempo.scheduler.slo import SLO, SLOClass

gaps = st.lists(st.floats(0.0, 2.0, allow_nan=False), min_size=1, max_size=12)


@st.composite
def outcome_sets(draw: st.DrawFn) -> list[RequestOutcome]:
    outcomes: list[RequestOutcome] = []
    for index in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(list(SLOClass)))
        arrival = draw(st.floats(0.0, 5.0))
        times = tuple(arrival + sum(draw(gaps)[: i + 1]) for i in range(draw(st.integers(0, 8))))
        times = tuple(sorted(times))
        finished = bool(times) and draw(st.booleans())
        prompt = draw(st.integers(1, 50))
        if kind is SLOClass.LATENCY:
            slo = SLO.latency(draw(st.floats(0.1, 3.0)), draw(st.floats(0.05, 1.0)))
        elif kind is SLOClass.DEADLINE:
            slo = SLO.deadline(draw(st.floats(0.5, 10.0)))
        elif kind is SLOClass.COMPOUND:
            slo = SLO.compound(8.0)
        else:
            slo = SLO.best_effort()
        job = f"job{draw(st.integers(0, 1))}" if kind is SLOClass.COMPOUND else None
        outcomes.append(RequestOutcome(f"r{index}", slo, arrival, prompt, times, finished, job, 0.0 if job else None))
    return outcomes


weights = st.sampled_from([1.0, 8.0])


@settings(max_examples=200, deadline=None)
@given(outcome_sets(), weights)
def test_goodput_never_exceeds_tokens_delivered(outcomes: list[RequestOutcome], weight: float) -> None:
    report = account(outcomes, decode_weight=weight)
    assert 0 <= report.good_tokens <= report.delivered_tokens + 1e-9
    assert report.token_goodput <= report.raw_throughput + 1e-9
    for cls in report.per_class.values():
        assert cls.good_tokens <= cls.delivered_tokens + 1e-9
        assert cls.met <= cls.units


@st.composite
def on_time_outcomes(draw: st.DrawFn) -> list[RequestOutcome]:
    """Requests of every SLO class that finish all their tokens in time."""
    outcomes = []
    for index in range(draw(st.integers(1, 6))):
        arrival = draw(st.floats(0.0, 5.0))
        n = draw(st.integers(1, 10))
        kind = draw(st.sampled_from([SLOClass.LATENCY, SLOClass.DEADLINE, SLOClass.COMPOUND]))
        if kind is SLOClass.LATENCY:
            slo = SLO.latency(1.0, 0.2)
            early = draw(st.floats(0.0, 1.0))
            times = tuple(slo.token_due_s(arrival, i) - early * 0.2 for i in range(n))
        else:
            slo = SLO.deadline(5.0) if kind is SLOClass.DEADLINE else SLO.compound(5.0)
            times = tuple(sorted(arrival + draw(st.floats(0.0, 5.0)) for _ in range(n)))
        job = f"j{index}" if kind is SLOClass.COMPOUND else None
        outcomes.append(RequestOutcome(f"r{index}", slo, arrival, 3, times, True, job, arrival if job else None))
    return outcomes


@settings(max_examples=200, deadline=None)
@given(on_time_outcomes())
def test_meeting_every_slo_gives_attainment_one(outcomes: list[RequestOutcome]) -> None:
    report = account(outcomes)
    assert report.met == report.units
    assert all(c.attainment == 1.0 for c in report.per_class.values())
    assert report.good_tokens == report.delivered_tokens


@settings(max_examples=300, deadline=None)
@given(outcome_sets(), weights, st.data())
def test_delaying_any_token_never_raises_goodput(
    outcomes: list[RequestOutcome], weight: float, data: st.DataObject
) -> None:
    with_tokens = [i for i, o in enumerate(outcomes) if o.token_times_s]
    if not with_tokens:
        return
    victim = data.draw(st.sampled_from(with_tokens))
    original = outcomes[victim]
    token = data.draw(st.integers(0, len(original.token_times_s) - 1))
    delay = data.draw(st.floats(0.0, 5.0))
    # delaying token i pushes later tokens only as far as needed to keep order
    times = list(original.token_times_s)
    times[token] += delay
    for j in range(token + 1, len(times)):
        times[j] = max(times[j], times[j - 1])
    delayed = [*outcomes]
    delayed[victim] = replace(original, token_times_s=tuple(times))
    horizon = 100.0  # the same window for both runs, so only the good tokens can change
    before = account(outcomes, weight, duration_s=horizon)
    after = account(delayed, weight, duration_s=horizon)
    assert after.good_tokens <= before.good_tokens + 1e-9
    assert after.met <= before.met
