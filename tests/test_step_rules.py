"""The engine step rule (``scheduler/step_rules.py``): what one step gives to whom, shared by every engine."""

from __future__ import annotations

from dataclasses import dataclass

from tempo.scheduler.interface import Phase
from tempo.scheduler.step_rules import plan_step


@dataclass
class R:
    id: str
    phase: Phase = Phase.RUNNING
    prompt: int = 10
    generated: int = 1
    computed: int = 10
    pace_rate: float | None = None
    pace_owed: float = 0.0
    used: int = 0


def grant_all(r: R, scheduled: set[str]) -> bool:
    return True


def chunk_all(r: R, tokens: int) -> int:
    return tokens


def ids(plan: tuple[list[R], list[tuple[R, int]]]) -> tuple[list[str], list[tuple[str, int]]]:
    decodes, prefills = plan
    return [r.id for r in decodes], [(r.id, n) for r, n in prefills]


def test_decodes_first_then_prefill_chunks_in_run_order_within_the_budget() -> None:
    new = R("new", Phase.WAITING, prompt=300, generated=0, computed=0)
    half = R("half", prompt=500, generated=0, computed=100)
    run = [new, R("a"), half, R("b")]
    assert ids(plan_step(run, slots=10, budget=250, elapsed_s=0.0, reserve_decode=grant_all,
                         reserve_chunk=chunk_all)) == (["a", "b"], [("new", 248)])
    assert ids(plan_step(run, slots=10, budget=2000, elapsed_s=0.0, reserve_decode=grant_all,
                         reserve_chunk=chunk_all)) == (["a", "b"], [("new", 300), ("half", 400)])


def test_slots_cap_the_requests_per_step() -> None:
    run = [R(f"r{i}") for i in range(5)]
    assert ids(plan_step(run, 3, 100, 0.0, grant_all, chunk_all))[0] == ["r0", "r1", "r2"]


def test_a_request_ahead_of_its_pace_only_takes_a_slot_left_over() -> None:
    ahead = R("ahead", pace_rate=1.0, pace_owed=1.0, used=5)  # owed 1 + 1 tok/s x 2 s = 3 < 5 used
    within = R("within", pace_rate=10.0, pace_owed=1.0, used=5)  # 1 + 20 > 5
    run = [ahead, within, R("c")]
    assert ids(plan_step(run, 2, 100, 2.0, grant_all, chunk_all))[0] == ["within", "c"]
    assert ids(plan_step(run, 3, 100, 2.0, grant_all, chunk_all))[0] == ["within", "c", "ahead"]


def test_the_engine_kv_callbacks_have_the_last_word() -> None:
    full = R("full")
    new = R("new", Phase.WAITING, prompt=64, generated=0, computed=0)
    decodes, prefills = plan_step([full, new, R("ok")], 10, 100, 0.0,
                                  lambda r, s: r.id != "full", lambda r, n: min(n, 16))
    assert [r.id for r in decodes] == ["ok"]
    assert [(r.id, n) for r, n in prefills] == [("new", 16)]


def test_requests_not_in_run_get_nothing_and_empty_in_is_empty_out() -> None:
    assert plan_step([], 10, 100, 0.0, grant_all, chunk_all) == ([], [])
    preempted = R("w", Phase.WAITING, generated=5, computed=0)  # recomputes its prompt and output first
    decodes, prefills = plan_step([preempted], 10, 100, 0.0, grant_all, chunk_all)
    assert decodes == [] and [(r.id, n) for r, n in prefills] == [("w", 15)]
