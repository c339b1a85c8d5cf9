"""vLLM's queues as a policy sees them, and a policy's decision as vLLM's levers: no vLLM import here.

The scheduler plug-in (``scheduler.py``) owns vLLM's ``Request`` objects; this adapter keeps Tempo's view
of each live one (``LiveRequest``: SLO, ladder, first-token time, pace, tokens on time) and does the rest
as plain Python, so it is tested without an engine:

- ``snapshot``: a ``Snapshot`` of the live requests (residents in vLLM's running order, then waiting ones
  by arrival), reusing a request's ``RequestState`` object while nothing about it changed (the identity
  rule of ``tempo.scheduler.interface``);
- ``apply``: a decision becomes the run order and paces kept until the next one, plus the preemptions,
  rejections (with a reason for the client) and demotions the plug-in carries out now;
- ``plan``: each step, ``step_rules.plan_step`` over the run order: which residents decode or prefill this
  step (the others are skipped), which waiting requests vLLM may admit, and in what order;
- ``on_tokens`` / ``finish``: first-token and per-token times, tokens on time, and the completion record.

Compound jobs: the adapter tracks each job's first arrival (its deadline counts from there), its calls per
stage and the tokens of its finished calls; a rejected call aborts its job (its live siblings are
rejected, later calls are refused at arrival), as in the simulator.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from tempo.scheduler.bounds import BoundLadder
from tempo.scheduler.goodput import TIME_EPS_S
from tempo.scheduler.interface import (
    Decision,
    EngineLimits,
    EngineTiming,
    JobInfo,
    Phase,
    Policy,
    RequestState,
    Snapshot,
)
from tempo.scheduler.jobs import JobGraph
from tempo.scheduler.slo import SLOClass
from tempo.scheduler.step_rules import plan_step
from tempo.serving.vllm.slo_fields import (
    ESTIMATE_PROMPT_TOKENS_KEY,
    SKETCH_KEY,
    RequestSLO,
    SLODefaults,
    SLOFieldError,
    ladder_from_xargs,
    parse_request_slo,
)

log = logging.getLogger("tempo.serving.vllm")

RUNNING, WAITING = Phase.RUNNING, Phase.WAITING
DECISION_SAMPLES = 4096  # decision times kept for the report


class EngineRequest(Protocol):
    """What the adapter reads of a vLLM ``Request`` (tests pass simple objects)."""

    request_id: str
    status: Any
    arrival_time: float  # wall clock (time.time()), set by the API server
    num_prompt_tokens: int
    num_output_tokens: int
    num_computed_tokens: int
    num_output_placeholders: int  # async scheduling: tokens in flight
    num_preemptions: int
    priority: int
    sampling_params: Any  # max_tokens, extra_args


@dataclass
class JobTrack:
    """A compound job as the engine has seen it so far."""

    first_arrival_s: float
    stage_calls: dict[int, int] = field(default_factory=dict)
    done_tokens: int = 0
    live_calls: int = 0
    version: int = 0  # bumped when a call arrives or finishes: its siblings' states change
    failed: str | None = None  # why the job was aborted
    last_seen_s: float = 0.0
    prompts: dict[int, list[int]] = field(default_factory=dict)  # stage -> its calls' prompt tokens so far
    finished: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # stage -> (prompt, output) done
    app: str = ""
    learned: bool = False  # handed to the graph matcher

    def info(self, job_id: str, stage: int) -> JobInfo:
        """What a policy may know of this job for a call of ``stage``: the finished earlier stages."""
        history = tuple(tuple(self.finished[s]) for s in sorted(self.finished) if s < stage)
        return JobInfo(job_id, stage, self.first_arrival_s, self.stage_calls.get(stage, 1), self.done_tokens,
                       history, tuple(self.prompts.get(stage, ())))


class LiveRequest:
    """Tempo's record of one live vLLM request. ``prompt``, ``generated``, ``computed`` and ``phase`` read
    the vLLM request, so ``step_rules.plan_step`` sees the engine's current numbers."""

    __slots__ = (
        "app",
        "arrival_s",
        "bound",
        "demoted",
        "done",
        "estimate_prompt_tokens",
        "first_token_s",
        "id",
        "job",
        "job_id",
        "key",
        "ladder",
        "last_token_s",
        "late",
        "on_time",
        "pace_owed",
        "pace_rate",
        "rejected",
        "req",
        "sketch",
        "slo",
        "stage",
        "state",
        "used",
    )

    running_status: Any = "RUNNING"  # vLLM's RequestStatus.RUNNING (the plug-in sets it)

    def __init__(self, req: EngineRequest, rslo: RequestSLO, ladder: BoundLadder, job: JobTrack | None,
                 sketch: Any, estimate_prompt_tokens: Any = None) -> None:
        self.req = req
        self.id: str = req.request_id
        self.slo = rslo.slo
        self.app = rslo.app
        self.job_id = rslo.job_id
        self.stage = rslo.stage or 0
        self.job = job
        self.ladder = ladder
        self.bound = ladder.bound_at(0, req.sampling_params.max_tokens if req.sampling_params else None)
        self.arrival_s: float = req.arrival_time
        self.first_token_s: float | None = None
        self.last_token_s: float | None = None
        self.on_time = 0  # latency: output tokens emitted by their due time
        self.late = False  # latency: some token missed its due time
        self.demoted = False
        self.rejected: str | None = None  # the reason, when Tempo rejected it
        self.done = False
        self.used = 0  # tokens since the last decision (pacing)
        self.pace_rate: float | None = None
        self.pace_owed = 0.0
        self.state: RequestState | None = None
        self.key: tuple[Any, ...] | None = None
        self.sketch = sketch
        # the prompt length the front end asked the estimator with (the learner learns with it, too)
        self.estimate_prompt_tokens = (estimate_prompt_tokens if isinstance(estimate_prompt_tokens, int)
                                       and not isinstance(estimate_prompt_tokens, bool)
                                       and estimate_prompt_tokens >= 0 else None)

    # -- the step rule's view (tempo.scheduler.step_rules.StepRequest) ----------------------------
    @property
    def prompt(self) -> int:
        return int(self.req.num_prompt_tokens)

    @property
    def generated(self) -> int:
        return int(self.req.num_output_tokens)

    @property
    def computed(self) -> int:
        """KV progress without the async scheduler's in-flight placeholders."""
        return int(self.req.num_computed_tokens - self.req.num_output_placeholders)

    @property
    def phase(self) -> Phase:
        return RUNNING if self.req.status == self.running_status else WAITING

    @property
    def max_tokens(self) -> int | None:
        params = self.req.sampling_params
        return None if params is None else params.max_tokens


@dataclass
class AdapterStats:
    """Counters of what the adapter decided and applied (reported by the plug-in and the benchmark)."""

    decisions: int = 0
    decision_s: deque[float] = field(default_factory=lambda: deque(maxlen=DECISION_SAMPLES))
    decision_s_total: float = 0.0
    snapshot_s_total: float = 0.0
    runs_ordered: int = 0  # steps whose run order came from a decision
    paced_skips: int = 0  # resident-steps a running request was skipped (paused or ahead of its pace)
    held_waiting: int = 0  # waiting-steps a waiting request was held back
    policy_preemptions: int = 0
    engine_preemptions: int = 0
    rejections: int = 0
    rejected_by_job_abort: int = 0
    jobs_learned: int = 0  # finished compound jobs handed to the graph matcher
    demotions_by_class: dict[str, int] = field(default_factory=dict)  # SLO class -> requests demoted
    budget_cuts: int = 0  # decisions that lowered the token budget

    @property
    def demotions(self) -> int:
        return sum(self.demotions_by_class.values())

    def to_dict(self) -> dict[str, Any]:
        samples = sorted(self.decision_s)

        def pct(q: float) -> float | None:
            return samples[min(len(samples) - 1, int(q * len(samples)))] if samples else None

        return {"decisions": self.decisions, "decision_p50_s": pct(0.5), "decision_p99_s": pct(0.99),
                "decision_max_s": samples[-1] if samples else None, "decision_s_total": self.decision_s_total,
                "snapshot_s_total": self.snapshot_s_total, "paced_skips": self.paced_skips,
                "held_waiting": self.held_waiting, "policy_preemptions": self.policy_preemptions,
                "engine_preemptions": self.engine_preemptions, "rejections": self.rejections,
                "rejected_by_job_abort": self.rejected_by_job_abort, "demotions": self.demotions,
                "demotions_by_class": dict(self.demotions_by_class), "budget_cuts": self.budget_cuts}


@dataclass(frozen=True)
class Applied:
    """What the plug-in must do now to carry out a decision."""

    preempt: list[LiveRequest]
    reject: list[LiveRequest]  # each with ``rejected`` set to its reason


@dataclass(frozen=True)
class StepPlan:
    """One step: residents in the order vLLM should walk them, those to skip, waiting ones to admit."""

    running_order: list[Any]  # vLLM requests: planned ones first, then the rest (the tail is the KV victim)
    skip: list[Any]  # residents that get no token this step
    admit: list[Any]  # waiting requests vLLM may admit, in order
    token_budget: int


def _grant_decode(r: LiveRequest, scheduled: set[str]) -> bool:
    return not r.done


def _grant_chunk(r: LiveRequest, tokens: int) -> int:
    return 0 if r.done else tokens


class EngineAdapter:
    """Tempo's side of the plug-in; see the module docstring."""

    def __init__(self, policy: Policy, defaults: SLODefaults, token_budget: int, slots: int,
                 fallback_bound: Callable[[SLOClass, int | None], BoundLadder] | None = None,
                 job_ttl_s: float = 3600.0, clock: Callable[[], float] = time.time,
                 learn_job: Callable[[str, JobGraph], None] | None = None, job_done_s: float = 120.0) -> None:
        self.policy = policy
        self.defaults = defaults
        self.token_budget = token_budget  # the engine's budget per step
        self.slots = slots  # requests per step the policy plans for
        self.fallback_bound = fallback_bound or (lambda cls, max_tokens: BoundLadder.fixed(
            max_tokens or 1024, fallback=True))
        self.job_ttl_s = job_ttl_s
        # a job with no call for ``job_done_s`` is taken as finished and handed to ``learn_job`` (the graph
        # matcher learns it online); a stage comes as soon as the one before ends, or after a tool's time
        self.learn_job = learn_job
        self.job_done_s = job_done_s
        self.clock = clock
        self.live: dict[str, LiveRequest] = {}
        self.jobs: OrderedDict[str, JobTrack] = OrderedDict()
        self.to_learn: OrderedDict[str, JobTrack] = OrderedDict()  # jobs not yet learned, by last arrival
        self.stats = AdapterStats()
        self.run: list[LiveRequest] = []
        self.budget = token_budget
        self.decided_at = 0.0
        self.steps_since_decision = 0
        self.dirty = True
        self.bad_fields = 0  # requests whose SLO fields the engine could not read (default SLO used)

    # ------------------------------------------------------------------ arrivals
    def add(self, req: EngineRequest) -> LiveRequest:
        """A new request: its SLO and ladder from ``extra_args`` (written by the front end)."""
        params = req.sampling_params
        xargs: Mapping[str, Any] = (params.extra_args if params is not None else None) or {}
        try:
            rslo = parse_request_slo(xargs, {}, self.defaults, allow_reserved=True)
        except SLOFieldError:
            self.bad_fields += 1  # not through the front end (e.g. the offline API): serve it with the default
            rslo = parse_request_slo({}, {}, self.defaults)
        max_tokens = params.max_tokens if params is not None else None
        ladder = ladder_from_xargs(xargs) or self.fallback_bound(rslo.slo.slo_class, max_tokens)
        job = None
        if rslo.job_id is not None:
            job = self.jobs.get(rslo.job_id)
            if job is None:
                job = self.jobs[rslo.job_id] = JobTrack(first_arrival_s=req.arrival_time, app=rslo.app)
            self.jobs.move_to_end(rslo.job_id)
            if self.learn_job is not None and not job.learned:
                self.to_learn[rslo.job_id] = job
                self.to_learn.move_to_end(rslo.job_id)
            job.stage_calls[rslo.stage or 0] = job.stage_calls.get(rslo.stage or 0, 0) + 1
            job.prompts.setdefault(rslo.stage or 0, []).append(int(req.num_prompt_tokens))
            job.live_calls += 1
            job.version += 1
            job.last_seen_s = req.arrival_time
        live = LiveRequest(req, rslo, ladder, job, xargs.get(SKETCH_KEY), xargs.get(ESTIMATE_PROMPT_TOKENS_KEY))
        self.live[live.id] = live
        self.dirty = True
        return live

    def refused_at_arrival(self, live: LiveRequest) -> str | None:
        """Why a new request is rejected before it runs (a call of an aborted job), or None."""
        job = live.job
        if job is not None and job.failed is not None:
            return f"tempo: rejected: its compound job was aborted ({job.failed})"
        return None

    # ------------------------------------------------------------------ decisions
    def due(self) -> bool:
        frame = self.policy.frame_steps
        return self.dirty or (frame is not None and self.steps_since_decision >= frame)

    def _state(self, r: LiveRequest, block_size: int) -> RequestState:
        req = r.req
        phase = RUNNING if req.status == r.running_status else WAITING
        generated = int(req.num_output_tokens)
        computed = int(req.num_computed_tokens - req.num_output_placeholders)
        job = r.job
        key = (generated, computed, phase, r.demoted, req.num_preemptions, job.version if job else 0)
        if key == r.key and r.state is not None:
            return r.state
        per_token = None
        if generated >= 2 and r.first_token_s is not None and r.last_token_s is not None:
            per_token = (r.last_token_s - r.first_token_s) / (generated - 1)
        info = None
        if job is not None:
            info = job.info(r.job_id or "", r.stage)
        blocks = -(-computed // block_size) if phase is RUNNING else 0
        state = RequestState(
            r.id, r.slo, r.arrival_s, int(req.num_prompt_tokens), r.ladder, phase, generated, computed, blocks,
            r.app, r.first_token_s, per_token, int(req.priority), r.max_tokens, info, r.demoted,
            int(req.num_preemptions),
        )
        r.state, r.key = state, key
        return state

    def snapshot(self, running: Sequence[Any], waiting: Iterable[Any], limits: EngineLimits, timing: EngineTiming,
                 step: int, now: float | None = None) -> Snapshot:
        """Residents in vLLM's running order, then waiting requests by arrival."""
        now = self.clock() if now is None else now
        live, block = self.live, limits.block_size
        states = [self._state(live[q.request_id], block) for q in running if q.request_id in live]
        queued = sorted((live[q.request_id] for q in waiting if q.request_id in live),
                        key=lambda r: (r.arrival_s, r.id))
        states.extend(self._state(r, block) for r in queued)
        return Snapshot(now, tuple(states), limits, timing, step)

    def decide(self, snapshot: Snapshot) -> Decision:
        started = time.perf_counter()
        decision = self.policy.decide(snapshot)
        elapsed = time.perf_counter() - started
        self.stats.decisions += 1
        self.stats.decision_s.append(elapsed)
        self.stats.decision_s_total += elapsed
        return decision

    def apply(self, decision: Decision, now: float | None = None) -> Applied:
        """Keep the run order and paces; return what to preempt and reject now (demotions are done here)."""
        now = self.clock() if now is None else now
        live = self.live
        rejected: list[LiveRequest] = []
        for rid in decision.reject:
            r = live.get(rid)
            if r is not None and not r.done and r.rejected is None:
                r.rejected = self._reason(r, now)
                rejected.append(r)
                self._abort_job(r, rejected)
        for rid in decision.demote:
            r = live.get(rid)
            if r is not None and not r.demoted:
                r.demoted = True
                cls = r.slo.slo_class.value
                self.stats.demotions_by_class[cls] = self.stats.demotions_by_class.get(cls, 0) + 1
        preempt = [r for r in (live.get(p.request_id) for p in decision.preempt)
                   if r is not None and r.rejected is None and r.phase is RUNNING]
        self.stats.policy_preemptions += len(preempt)
        self.stats.rejections += len(rejected)
        self.run = [r for r in (live.get(rid) for rid in decision.run) if r is not None and r.rejected is None]
        for r in self.run:
            r.used = 0
            r.pace_rate = None
        for pace in decision.pace:
            r = live.get(pace.request_id)
            if r is not None:
                r.pace_rate = pace.tokens_per_s
                r.pace_owed = pace.owed_tokens
        budget = self.token_budget
        self.budget = budget if decision.token_budget is None else max(1, min(budget, decision.token_budget))
        self.stats.budget_cuts += int(self.budget < budget)
        self.decided_at = now
        self.steps_since_decision = 0
        self.dirty = False
        return Applied(preempt, rejected)

    def _reason(self, r: LiveRequest, now: float) -> str:
        slo = r.slo
        if slo.deadline_s is not None and now > r.arrival_s + slo.deadline_s:
            return "tempo: rejected: its deadline has passed"
        if slo.job_deadline_s is not None and r.job is not None and now > r.job.first_arrival_s + slo.job_deadline_s:
            return "tempo: rejected: its job's deadline has passed"
        return "tempo: rejected: it can no longer meet its SLO under the current load"

    def _abort_job(self, r: LiveRequest, rejected: list[LiveRequest]) -> None:
        job = r.job
        if job is None or job.failed is not None:
            return
        job.failed = f"call {r.id} was rejected"
        for sibling in self.live.values():
            if sibling.job is job and sibling is not r and not sibling.done and sibling.rejected is None:
                sibling.rejected = f"tempo: rejected: its compound job was aborted ({job.failed})"
                rejected.append(sibling)
                self.stats.rejected_by_job_abort += 1

    # ------------------------------------------------------------------ steps
    def plan(self, running: Sequence[Any], now: float | None = None) -> StepPlan:
        """The step rule over the current run order (see ``tempo.scheduler.step_rules``)."""
        now = self.clock() if now is None else now
        self.steps_since_decision += 1
        decodes, prefills = plan_step(self.run, self.slots, self.budget, now - self.decided_at, _grant_decode,
                                      _grant_chunk)
        resident = {q.request_id for q in running}
        first = [r.req for r in decodes if r.id in resident]
        first += [r.req for r, _ in prefills if r.id in resident]
        admit = [r.req for r, _ in prefills if r.id not in resident]
        chosen = {q.request_id for q in first}
        rank = {r.id: i for i, r in enumerate(self.run)}
        listed = sorted((q for q in running if q.request_id not in chosen and q.request_id in rank),
                        key=lambda q: rank[q.request_id])
        paused = [q for q in running if q.request_id not in chosen and q.request_id not in rank]
        skip = listed + paused
        self.stats.paced_skips += len(skip)
        return StepPlan(first + skip, skip, admit, self.budget)

    # ------------------------------------------------------------------ tokens and finishes
    def on_tokens(self, r: LiveRequest, count: int, now: float) -> None:
        """``count`` new output tokens of ``r`` at ``now`` (``generated`` already includes them)."""
        if count <= 0:
            return
        generated = r.generated
        first_index = generated - count
        if r.first_token_s is None:
            r.first_token_s = now
        r.last_token_s = now
        r.used += count
        slo = r.slo
        if slo.slo_class is SLOClass.LATENCY:
            assert slo.ttft_s is not None and slo.tbt_s is not None
            # token i is due at arrival + ttft + i * tbt: the tokens from index ceil(...) on are on time
            earliest_on_time = math.ceil((now - TIME_EPS_S - r.arrival_s - slo.ttft_s) / slo.tbt_s)
            on_time = generated - max(first_index, earliest_on_time)
            r.on_time += max(0, min(count, on_time))
            if earliest_on_time > first_index:
                r.late = True

    def finish(self, r: LiveRequest, finish_reason: str, now: float) -> dict[str, Any]:
        """The request left the engine: its completion record (DESIGN section 3). Removes it."""
        r.done = True
        self.live.pop(r.id, None)
        self.dirty = True
        job = r.job
        prompt, output = r.prompt, r.generated
        if job is not None:
            job.live_calls -= 1
            job.version += 1
            job.last_seen_s = now
            if r.rejected is None and finish_reason in ("stop", "length"):
                job.done_tokens += prompt + output
                job.finished.setdefault(r.stage, []).append((prompt, output))
        self._expire_jobs(now)
        reason = "rejected" if r.rejected is not None else finish_reason
        completed = reason in ("stop", "length")
        slo, cls = r.slo, r.slo.slo_class
        met: bool | None = False
        good = 0
        if cls is SLOClass.LATENCY:  # tokens on time count even when the request did not complete
            assert slo.ttft_s is not None
            first_ok = r.first_token_s is not None and r.first_token_s <= r.arrival_s + slo.ttft_s + TIME_EPS_S
            good = r.on_time + (prompt if first_ok else 0)
            met = completed and not r.late
        elif cls is SLOClass.BEST_EFFORT:
            met = None
        elif not completed:
            met = False
        elif cls is SLOClass.DEADLINE:
            assert slo.deadline_s is not None
            met = now <= r.arrival_s + slo.deadline_s + TIME_EPS_S
            good = prompt + output if met else 0
        else:  # compound: this call is done by the job deadline (the job counts when its last call is)
            assert slo.job_deadline_s is not None and job is not None
            met = now <= job.first_arrival_s + slo.job_deadline_s + TIME_EPS_S
            good = prompt + output if met else 0
        record: dict[str, Any] = {
            "request_id": r.id,
            "app": r.app,
            "slo_class": cls.value,
            "prompt_tokens": prompt,
            "output_tokens": output,
            "arrival_s": r.arrival_s,
            "first_token_s": r.first_token_s,
            "finish_s": now,
            "bound": r.bound,
            "bound_fallback": r.ladder.fallback,
            "slo_met": met,
            "good_tokens": good,
            "finish_reason": reason,
            "preemptions": int(r.req.num_preemptions),
            "demoted": r.demoted,
        }
        if r.rejected is not None:
            record["reject_reason"] = r.rejected
        if r.job_id is not None:
            record["job_id"], record["stage"] = r.job_id, r.stage
        if r.sketch is not None:
            record["sketch"] = r.sketch
        if r.estimate_prompt_tokens is not None:
            record["estimate_prompt_tokens"] = r.estimate_prompt_tokens
        return record

    def _expire_jobs(self, now: float) -> None:
        """Learn the jobs idle for ``job_done_s`` (oldest arrivals first) and forget those idle for
        ``job_ttl_s`` (their next stage would have come by then)."""
        while self.learn_job is not None and self.to_learn:
            job_id, job = next(iter(self.to_learn.items()))
            if job.live_calls > 0 or now - job.last_seen_s < self.job_done_s:
                break
            del self.to_learn[job_id]
            if job.failed is None and job.finished:
                job.learned = True
                try:
                    self.learn_job(job.app, [job.finished[s] for s in sorted(job.finished)])
                except (ValueError, FloatingPointError):  # a job the matcher cannot learn is not learned
                    log.exception("tempo: job %s not learned", job_id)
                    continue
                self.stats.jobs_learned += 1
        while self.jobs:
            job_id, job = next(iter(self.jobs.items()))
            if job.live_calls > 0 or now - job.last_seen_s < self.job_ttl_s:
                return
            del self.jobs[job_id]
