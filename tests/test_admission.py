"""Job-level admission: calls of admitted jobs use the reserve, a refused call drops its job, memory bounded."""

from __future__ import annotations

import pytest
from tempo.serving.vllm.admission import JOB_DROPPED, QUEUE_FULL, JobAdmission


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_new_work_stops_at_the_open_limit_calls_of_admitted_jobs_at_the_hard_one() -> None:
    admission = JobAdmission(max_in_flight=8, reserve=2)
    assert admission.decide(None, 5) is None
    assert admission.decide(None, 6) == QUEUE_FULL  # 6 in flight: only the reserve is left
    assert admission.decide("job-a", 5) is None  # a new job: open slots
    assert admission.decide("job-a", 7) is None  # its next call: the reserve
    assert admission.decide("job-b", 6) == QUEUE_FULL  # a new job does not get the reserve
    assert admission.decide("job-a", 8) == QUEUE_FULL  # nothing left at all


def test_a_refused_call_drops_its_job_whole() -> None:
    admission = JobAdmission(max_in_flight=4, reserve=1)
    assert admission.decide("job", 0) is None
    assert admission.decide("job", 4) == QUEUE_FULL
    assert admission.decide("job", 0) == JOB_DROPPED  # later calls too, though there is room now
    assert admission.decide("new", 3) == QUEUE_FULL
    assert admission.decide("new", 0) == JOB_DROPPED  # refused at its first call: its fan-out siblings too


def test_jobs_are_forgotten_after_the_ttl_and_beyond_max_jobs() -> None:
    clock = Clock()
    admission = JobAdmission(max_in_flight=4, reserve=1, ttl_s=10.0, max_jobs=3, clock=clock)
    for i in range(5):
        admission.decide(f"job-{i}", 0)
    assert len(admission) == 3
    clock.now = 11.0
    admission.decide("late", 0)
    assert len(admission) == 1
    admission.decide("dropped", 3)
    clock.now = 30.0
    assert admission.decide("dropped", 0) is None  # forgotten: a new job again


def test_reserve_must_leave_room_for_new_work() -> None:
    with pytest.raises(ValueError):
        JobAdmission(max_in_flight=4, reserve=4)


def test_admitted_work_keeps_jobs_that_got_in_and_leaves_out_jobs_refused_at_the_door() -> None:
    from tempo.scheduler.goodput import RequestOutcome
    from tempo.scheduler.slo import SLO
    from tempo.serving.chaos.soak import admitted_work

    def call(rid: str, job: str | None) -> RequestOutcome:
        slo = SLO.compound(60.0) if job else SLO.deadline(60.0)
        return RequestOutcome(request_id=rid, slo=slo, arrival_s=0.0, prompt_tokens=1, token_times_s=(),
                              finished=False, job_id=job)

    outcomes = [call("r1", None), call("r2", None), call("a0", "a"), call("a1", "a"), call("b0", "b"),
                call("b1", "b"), call("c0", "c")]
    sent = {"r1", "r2", "a0", "a1", "b0", "c0"}  # b1 never sent: b's first call was refused
    refused = {"r2", "a1", "b0"}  # a got in, then lost its second call: a miss that counts
    kept = {o.request_id for o in admitted_work(outcomes, sent, refused)}
    assert kept == {"r1", "a0", "a1", "c0"}
