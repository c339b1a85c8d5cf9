"""The vLLM adapter without an engine: SLO fields in, snapshot out, decisions applied as vLLM's levers,
tokens on time and completion records (requests are plain objects with the attributes vLLM's have)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tempo.scheduler.bounds import BoundLadder
from tempo.scheduler.goodput import RequestOutcome, latency_good_tokens
from tempo.scheduler.interface import Decision, Pace, Phase, Policy, Preemption, Snapshot
from tempo.scheduler.slo import SLO, SLOClass
from tempo.scheduler.testing import make_limits, make_timing
from tempo.serving.vllm.adapter import EngineAdapter
from tempo.serving.vllm.slo_fields import (
    SLODefaults,
    SLOFieldError,
    ladder_from_xargs,
    ladder_to_xargs,
    parse_request_slo,
)

RUNNING, WAITING = "RUNNING", "WAITING"


@dataclass
class Req:
    request_id: str
    arrival_time: float = 100.0
    num_prompt_tokens: int = 20
    num_output_tokens: int = 0
    num_computed_tokens: int = 0
    num_output_placeholders: int = 0
    num_preemptions: int = 0
    priority: int = 0
    status: str = WAITING
    xargs: dict[str, Any] = field(default_factory=dict)
    max_tokens: int | None = 64

    @property
    def sampling_params(self) -> Any:
        return SimpleNamespace(max_tokens=self.max_tokens, extra_args=self.xargs)

    def decode(self, n: int = 1) -> None:
        self.status = RUNNING
        self.num_output_tokens += n
        self.num_computed_tokens = self.num_prompt_tokens + self.num_output_tokens - 1


class Scripted(Policy):
    """Answers whatever decision the test sets."""

    name = "scripted"
    frame_steps = 10

    def __init__(self) -> None:
        self.decision = Decision.empty()
        self.seen: list[Snapshot] = []

    def decide(self, snapshot: Snapshot) -> Decision:
        self.seen.append(snapshot)
        return self.decision


def adapter(policy: Policy | None = None, slots: int = 256, budget: int = 2048) -> EngineAdapter:
    return EngineAdapter(policy or Scripted(), SLODefaults(), budget, slots, clock=lambda: 100.0)


def xargs(**fields: Any) -> dict[str, Any]:
    return {**fields, **ladder_to_xargs(BoundLadder(((0, 50), (25, 80))))}


# ---------------------------------------------------------------- SLO fields
def test_slo_fields_are_parsed_with_defaults_and_headers() -> None:
    d = SLODefaults()
    assert parse_request_slo(None, {}, d).slo == SLO.latency(d.ttft_s, d.tbt_s)
    assert parse_request_slo({"deadline_s": 30}, {}, d).slo == SLO.deadline(30)  # the class follows the field
    r = parse_request_slo({}, {"x-slo-ttft-ms": "500", "x-slo-tpot-ms": "40"}, d)
    assert r.slo == SLO.latency(0.5, 0.04)
    c = parse_request_slo({"slo_class": "compound", "job_id": "j1", "stage": 2, "job_deadline_s": 60,
                           "app": "deep_research"}, {}, d)
    assert (c.slo, c.job_id, c.stage, c.app) == (SLO.compound(60), "j1", 2, "deep_research")
    assert parse_request_slo({"slo_class": "best_effort"}, {}, SLODefaults(slo_class=SLOClass.DEADLINE)).slo == \
        SLO.best_effort()
    assert parse_request_slo(c.to_xargs(), {}, d) == c  # normalised fields read back the same


@pytest.mark.parametrize(("fields", "headers", "message"), [
    ({"slo_class": "urgent"}, {}, "slo_class"),
    ({"slo_class": "deadline", "ttft_slo_s": 1}, {}, "does not apply"),
    ({"deadline_s": -1}, {}, "deadline_s"),
    ({"deadline_s": "soon"}, {}, "deadline_s"),
    ({"deadline_s": 1e12}, {}, "deadline_s"),
    ({"slo_class": "compound"}, {}, "job_id"),
    ({"tempo_ladder": [0, 5]}, {}, "reserved"),
    ({"slo_class": "deadline"}, {"x-slo-ttft-ms": "100"}, "latency"),
    ({}, {"x-slo-tpot-ms": "fast"}, "milliseconds"),
    ({}, {"x-slo-ttft-ms": "nan"}, "milliseconds"),
])
def test_bad_slo_fields_are_one_line_errors(fields: dict[str, Any], headers: dict[str, str], message: str) -> None:
    with pytest.raises(SLOFieldError) as err:
        parse_request_slo(fields, headers, SLODefaults())
    assert message in str(err.value) and "\n" not in str(err.value)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["slo_class", "ttft_slo_s", "tbt_slo_s", "deadline_s", "job_id", "stage",
                                        "job_deadline_s", "app", "other"]),
                       st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=5),
                                 st.lists(st.integers(), max_size=3))),
       st.dictionaries(st.sampled_from(["x-slo-ttft-ms", "x-slo-tpot-ms"]), st.text(max_size=8)))
def test_any_fields_parse_or_raise_slo_field_error(fields: dict[str, Any], headers: dict[str, str]) -> None:
    with contextlib.suppress(SLOFieldError):
        parse_request_slo(fields, headers, SLODefaults())


def test_ladders_travel_as_flat_lists() -> None:
    ladder = BoundLadder(((0, 40), (10, 60)), 0.95, fallback=True)
    assert ladder_from_xargs(ladder_to_xargs(ladder)) == ladder
    assert ladder_from_xargs({"tempo_ladder": [0, 5, 3]}) is None
    assert ladder_from_xargs({"tempo_ladder": [5, 1]}) is None  # not a valid ladder


# ---------------------------------------------------------------- arrivals and snapshots
def test_requests_bring_their_slo_and_ladder_or_a_flagged_fallback() -> None:
    a = adapter()
    live = a.add(Req("r1", xargs=xargs(slo_class="deadline", deadline_s=9, app="code/Mbpp")))
    assert live.slo == SLO.deadline(9) and live.app == "code/Mbpp" and live.ladder.steps == ((0, 50), (25, 80))
    bare = a.add(Req("r2", xargs={"slo_class": "bogus"}))  # not through the front end: the default SLO
    assert bare.slo.slo_class is SLOClass.LATENCY and bare.ladder.fallback and a.bad_fields == 1


def test_snapshot_order_and_state_identity() -> None:
    a = adapter()
    late, early, run = Req("late", arrival_time=101.0), Req("early", arrival_time=99.0), Req("run")
    for r in (late, early, run):
        a.add(r)
    run.decode()
    snap = a.snapshot([run], [late, early], make_limits(block_size=16), make_timing(), step=3)
    assert [s.request_id for s in snap.requests] == ["run", "early", "late"]
    assert snap.requests[0].phase is Phase.RUNNING and snap.requests[0].kv_blocks == 2
    again = a.snapshot([run], [late, early], make_limits(block_size=16), make_timing(), step=4)
    assert all(x is y for x, y in zip(snap.requests, again.requests, strict=True))  # unchanged: same objects
    run.decode()
    third = a.snapshot([run], [late, early], make_limits(block_size=16), make_timing(), step=5)
    assert third.requests[0] is not snap.requests[0] and third.requests[0].generated == 2
    assert third.requests[1] is snap.requests[1]


def test_a_compound_call_sees_its_job() -> None:
    a = adapter()
    first = Req("c0", arrival_time=50.0, xargs=xargs(slo_class="compound", job_id="J", stage=0, job_deadline_s=90))
    a.add(first)
    first.decode(5)
    a.finish(a.live["c0"], "stop", 60.0)
    call = Req("c1", arrival_time=61.0, xargs=xargs(slo_class="compound", job_id="J", stage=1, job_deadline_s=90))
    a.add(call)
    state = a.snapshot([], [call], make_limits(), make_timing(), 0).requests[0]
    assert state.job is not None and state.job.job_arrival_s == 50.0 and state.job.done_tokens == 25
    assert state.arrival_s == 61.0  # the call's own release time
    assert state.job.history == (((20, 5),),) and state.job.stage_prompts == (20,)  # what graph matching sees


def test_a_finished_job_is_learned_once_after_it_goes_quiet() -> None:
    learned: list[tuple[str, list[list[tuple[int, int]]]]] = []
    a = EngineAdapter(Scripted(), SLODefaults(), 2048, 256, clock=lambda: 100.0, job_done_s=30.0,
                      learn_job=lambda app, graph: learned.append((app, graph)))
    for stage, (rid, t) in enumerate([("s0", 50.0), ("s1", 60.0)]):
        req = Req(rid, arrival_time=t, xargs=xargs(slo_class="compound", job_id="J", stage=stage, job_deadline_s=90,
                                                   app="research"))
        a.add(req)
        req.decode(3 + stage)
        a.finish(a.live[rid], "stop", t + 5)
    assert learned == []  # quiet for 5 s only: its next stage may still come
    a.add(Req("other", xargs=xargs()))
    a.finish(a.live["other"], "stop", 100.0)  # 35 s after the job's last call
    a.finish(a.live.get("other") or a.add(Req("again", xargs=xargs())), "stop", 101.0)
    assert learned == [("research", [[(20, 3)], [(20, 4)]])] and a.stats.jobs_learned == 1


# ---------------------------------------------------------------- decisions
def test_rejections_carry_a_reason_and_abort_the_job() -> None:
    a = adapter()
    a.add(Req("d", arrival_time=80.0, xargs=xargs(deadline_s=5)))
    for i in range(2):
        a.add(Req(f"j{i}", xargs=xargs(slo_class="compound", job_id="J", stage=0, job_deadline_s=60)))
    applied = a.apply(Decision(reject=("d", "j0")), now=100.0)
    reasons = {r.id: r.rejected for r in applied.reject}
    assert reasons["d"] == "tempo: rejected: its deadline has passed"
    assert "can no longer meet" in (reasons["j0"] or "") and "aborted" in (reasons["j1"] or "")
    later = a.add(Req("j2", xargs=xargs(slo_class="compound", job_id="J", stage=1, job_deadline_s=60)))
    assert "aborted" in (a.refused_at_arrival(later) or "")
    assert a.stats.rejections == 3 and a.stats.rejected_by_job_abort == 1
    record = a.finish(a.live["d"], "abort", 100.0)
    assert record["finish_reason"] == "rejected" and record["slo_met"] is False and record["good_tokens"] == 0


def test_demotion_preemption_and_budget() -> None:
    a = adapter()
    run, wait = Req("run"), Req("wait")
    a.add(run)
    a.add(wait)
    run.decode()
    applied = a.apply(Decision(run=("run",), preempt=(Preemption("run"), Preemption("wait")), demote=("wait",),
                               token_budget=128), now=100.0)
    assert [r.id for r in applied.preempt] == ["run"]  # only residents can be preempted
    assert a.live["wait"].demoted and a.budget == 128 and a.stats.budget_cuts == 1
    assert not a.due()
    assert a.stats.demotions_by_class == {a.live["wait"].slo.slo_class.value: 1}
    a.apply(Decision(run=("run",), demote=("wait",)), now=100.0)  # a request is demoted once
    assert a.stats.demotions == 1 and sum(a.stats.demotions_by_class.values()) == 1


def test_the_plan_skips_paused_and_ahead_residents_and_admits_in_run_order() -> None:
    a = adapter(slots=2)
    reqs = {n: Req(n) for n in ("paused", "paced", "free", "new1", "new2")}
    for r in reqs.values():
        a.add(r)
    for n in ("paused", "paced", "free"):
        reqs[n].decode()
    a.apply(Decision(run=("paced", "free", "new2", "new1"), pace=(Pace("paced", 1.0, 0.0),)), now=100.0)
    running = [reqs["paused"], reqs["paced"], reqs["free"]]
    plan = a.plan(running, now=100.0)
    assert [q.request_id for q in plan.running_order[:1]] == ["free"]
    assert {q.request_id for q in plan.skip} == {"paused", "paced"}
    assert plan.running_order[-1].request_id == "paused"  # vLLM's victim (running[-1]) is the paused one
    assert [q.request_id for q in plan.admit] == ["new2"]  # one slot left after the decode
    a.slots = 10
    plan = a.plan(running, now=100.0)
    assert [q.request_id for q in plan.admit] == ["new2", "new1"]
    assert {q.request_id for q in plan.skip} == {"paused"}  # a free slot goes to the paced request too


# ---------------------------------------------------------------- tokens and records
@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0.0, 2.0), st.integers(1, 3)), min_size=1, max_size=12),
       st.floats(0.05, 1.0), st.floats(0.01, 0.3))
def test_tokens_on_time_match_the_goodput_accounting(steps: list[tuple[float, int]], ttft: float,
                                                     tbt: float) -> None:
    a = adapter()
    req = Req("l", arrival_time=10.0, num_prompt_tokens=7, max_tokens=None,
              xargs=xargs(slo_class="latency", ttft_slo_s=ttft, tbt_slo_s=tbt))
    live = a.add(req)
    now, times = 10.0, []
    for gap, n in steps:
        now += gap
        req.decode(n)
        a.on_tokens(live, n, now)
        times += [now] * n
    record = a.finish(live, "stop", now)
    outcome = RequestOutcome("l", SLO.latency(ttft, tbt), 10.0, 7, tuple(times), finished=True)
    assert record["good_tokens"] == latency_good_tokens(outcome)
    assert record["slo_met"] == (latency_good_tokens(outcome) == 7 + len(times))
    assert record["first_token_s"] == times[0] and record["output_tokens"] == len(times)


def test_deadline_record_fields() -> None:
    a = adapter()
    req = Req("d", arrival_time=10.0, xargs={**xargs(deadline_s=5), "tempo_sketch": '{"n_chars": 3}',
                                             "tempo_estimate_prompt_tokens": 7})
    live = a.add(req)
    req.decode(4)
    a.on_tokens(live, 4, 12.0)
    record = a.finish(live, "length", 14.0)
    assert record["slo_met"] is True and record["good_tokens"] == 24 and record["bound"] == 50
    assert record["sketch"] == '{"n_chars": 3}' and record["estimate_prompt_tokens"] == 7 and "d" not in a.live
    late = a.add(Req("e", arrival_time=10.0, xargs={**xargs(deadline_s=5), "tempo_estimate_prompt_tokens": "7"}))
    late.req.decode(2)
    record = a.finish(late, "stop", 16.0)
    assert record["slo_met"] is False and "estimate_prompt_tokens" not in record  # not an int: not recorded
