"""The scheduling contract between an engine (the simulator, later vLLM) and a policy.

The engine calls ``Policy.decide(snapshot)`` from its busy loop: at least every ``policy.frame_steps``
engine steps, and at the next step after something changed (a request arrived, finished, was released
or preempted).
Between decisions the engine keeps following the last decision. Everything here is an immutable value;
policies are pure functions of the snapshot (plus what they were built with), so the same objects run
in the simulator and inside vLLM.

The engine's step, which every policy can rely on (it mirrors vLLM v1 with chunked prefill, as
Sarathi-Serve): walk ``Decision.run`` in order and (1) give every listed request that is decoding one
token (paced requests only while within their pace), then (2) give listed requests that still have
prompt (or recomputed) tokens to process a chunk of the remaining token budget, then (3) fill slots left
with the paced decodes that are ahead of their pace; stop at ``max_running`` requests per step or when
the budget is spent. ``step_rules.plan_step`` is this rule as code; every engine uses it. A request
holding KV blocks that is not listed is *paused*: it keeps its blocks and gets no tokens. When a decode
needs a new KV block and none is free, the engine preempts ``victim_order(...)``'s first request, in
``Decision.preempt_mode``.

What an engine keeps stable between steps, and policies may rely on:

- **State identity**: while nothing about a request changed (no token, no KV change, no demotion, no
  sibling released or finished), the engine hands over the *same* ``RequestState`` object; a new object
  means something changed. Policies may key memoised per-request work on ``id(state)`` (``tempo_table``
  does; a fresh object each time is correct but slow).
- **Order**: ``Snapshot.requests`` lists resident requests first (in the engine's current order), then
  swapped ones, then waiting ones by arrival.
- **Ids**: a request id names one request for its whole life, and is never reused.
- **Time**: ``Snapshot.now_s`` and every ``*_s`` field are on one clock, which never goes backwards.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import ClassVar, NamedTuple

from tempo.scheduler.bounds import BoundLadder
from tempo.scheduler.slo import SLO, SLOClass


class Phase(StrEnum):
    """Where a request's KV cache is."""

    WAITING = "waiting"  # no KV: never started, or preempted by recompute
    RUNNING = "running"  # KV resident on the GPU (scheduled, or paused)
    SWAPPED = "swapped"  # KV swapped out to host memory


class PreemptMode(StrEnum):
    RECOMPUTE = "recompute"  # drop the KV; the prompt and the tokens so far are prefilled again
    SWAP = "swap"  # copy the KV to host memory and back


class JobInfo(NamedTuple):
    """A compound call's job, as far as the engine knows it (no future stages: those are not released yet)."""

    job_id: str
    stage: int  # 0-based stage of this call
    job_arrival_s: float  # the job's arrival (its deadline counts from here)
    stage_calls: int = 1  # calls released in this stage (fan-out)
    done_tokens: int = 0  # prompt + output tokens of the job's finished calls (attained service)
    history: tuple[tuple[tuple[int, int], ...], ...] = ()  # finished stages, each call's (prompt, output) tokens
    stage_prompts: tuple[int, ...] = ()  # prompt tokens of this stage's calls released so far


class RequestState(NamedTuple):
    """One live request as a policy sees it. Never its true length: only the bound ladder.

    An immutable NamedTuple rather than a frozen dataclass: the engine builds one per live request for
    every decision, and a frozen dataclass costs ~10x more to construct (5 us against 0.5 us).
    """

    request_id: str
    slo: SLO  # the objective (read by: every SLO-aware policy)
    arrival_s: float  # when it reached the engine; compound: when its stage was released
    prompt_tokens: int
    ladder: BoundLadder  # conditional upper bounds on the response length
    phase: Phase = Phase.WAITING
    generated: int = 0  # output tokens emitted so far
    computed_tokens: int = 0  # tokens whose KV is cached (prompt + output); 0 after a recompute preemption
    kv_blocks: int = 0  # GPU KV blocks held now (swapped requests: blocks they need back)
    app: str = "default"
    first_token_s: float | None = None
    per_token_s: float | None = None  # measured mean time between this request's tokens
    priority: int = 0  # static user priority, lower first (vLLM's ``priority``)
    max_tokens: int | None = None
    job: JobInfo | None = None  # compound calls only
    demoted: bool = False  # demoted to best effort by an earlier decision
    preemptions: int = 0

    @property
    def slo_class(self) -> SLOClass:
        return self.slo.slo_class

    @property
    def pending_tokens(self) -> int:
        """Tokens to compute before the next token is sampled: 1 while decoding, the prompt when new."""
        return self.prompt_tokens + self.generated - self.computed_tokens

    @property
    def decoding(self) -> bool:
        return self.phase is Phase.RUNNING and self.generated > 0 and self.pending_tokens == 1

    @property
    def resident(self) -> bool:
        return self.phase is Phase.RUNNING

    @property
    def best_effort(self) -> bool:
        return self.demoted or self.slo.slo_class is SLOClass.BEST_EFFORT

    def remaining_bound(self) -> int:
        """Upper bound on the output tokens still to come (>= 1)."""
        return self.ladder.remaining_at(self.generated, self.max_tokens)


@dataclass(frozen=True, slots=True)
class EngineLimits:
    """The engine's capacity as of this snapshot."""

    token_budget: int  # tokens per step [max_num_batched_tokens]
    max_running: int  # requests per step [max_num_seqs]
    kv_blocks_total: int
    kv_blocks_free: int
    block_size: int
    swap_blocks_free: int = 0  # host blocks for swapping; 0: the engine cannot swap


@dataclass(frozen=True, slots=True)
class EngineTiming:
    """The engine's cost model, linear and measured or profiled: what a step of a given shape costs.

    ``step_time(decodes, kv_tokens, prefill_tokens)`` ~= ``base_s + per_seq_s * (decodes + prefill_tokens)
    + per_kv_token_s * kv_tokens + per_prefill_token_s * prefill_tokens``.
    """

    base_s: float  # a step of one short decode
    per_seq_s: float  # each further token in the batch (linear layers)
    per_kv_token_s: float  # each cached token a decode reads (attention)
    per_prefill_token_s: float  # extra per prefill token (prefill attention), on top of per_seq_s
    recent_step_s: float | None = None  # measured: mean of the last steps
    swap_s_per_block: float | None = None  # None: no swap
    recompute_s_per_token: float = 0.0  # prefill throughput when recomputing (s per token)

    def step_time(self, decodes: int, kv_tokens: int, prefill_tokens: int = 0) -> float:
        return (
            self.base_s
            + self.per_seq_s * max(0, decodes + prefill_tokens - 1)
            + self.per_kv_token_s * kv_tokens
            + self.per_prefill_token_s * prefill_tokens
        )


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything a policy may look at. ``requests``: resident ones first (in the engine's current order),
    then swapped ones, then waiting ones by arrival."""

    now_s: float
    requests: tuple[RequestState, ...]
    limits: EngineLimits
    timing: EngineTiming
    step: int = 0  # engine steps so far

    @classmethod
    def empty(cls, limits: EngineLimits, timing: EngineTiming, now_s: float = 0.0) -> Snapshot:
        return cls(now_s, (), limits, timing)


class Preemption(NamedTuple):
    request_id: str
    mode: PreemptMode = PreemptMode.RECOMPUTE


class Pace(NamedTuple):
    """Just-enough decode bandwidth for one request: until the next decision it decodes at full priority
    only while its tokens since the decision stay below ``owed_tokens + tokens_per_s * elapsed``; beyond
    that it decodes only in slots nothing else in ``run`` wants (the engine stays work-conserving)."""

    request_id: str
    tokens_per_s: float
    owed_tokens: float = 1.0


@dataclass(frozen=True, slots=True)
class Decision:
    """What the engine does until the next decision."""

    run: tuple[str, ...] = ()  # ids in schedule order (read by the engine's step, see the module doc)
    pace: tuple[Pace, ...] = ()  # optional per-request bandwidth (requests in ``run`` without one: unpaced)
    preempt: tuple[Preemption, ...] = ()  # resident requests to evict now
    reject: tuple[str, ...] = ()  # requests to drop now; the engine reports them as rejected
    demote: tuple[str, ...] = ()  # requests to treat as best effort from now on (their SLO still counts)
    token_budget: int | None = None  # cap on tokens per step for this frame (None: the engine's limit)
    preempt_mode: PreemptMode = PreemptMode.RECOMPUTE  # mode of engine-initiated preemptions
    note: str = ""  # free text for traces

    @classmethod
    def empty(cls) -> Decision:
        return cls()


class Policy(ABC):
    """A scheduling policy. Implementations keep no per-request mutable state: ``decide`` is a function of
    the snapshot (caches that only memoise pure computations are allowed)."""

    name: ClassVar[str] = "policy"
    # The engine re-plans after arrivals, finishes, releases and preemptions, and at least every
    # ``frame_steps`` steps; None: only after such events (for policies whose plan depends on nothing else).
    frame_steps: int | None = 1

    @abstractmethod
    def decide(self, snapshot: Snapshot) -> Decision:
        """The plan for the next frame. Called repeatedly by the engine's busy loop: keep it fast."""

    def describe(self) -> dict[str, object]:
        """Parameters worth reporting beside the results."""
        return {"name": self.name, "frame_steps": self.frame_steps}


def victim_order(run: Sequence[str], residents: Sequence[str]) -> list[str]:
    """Which resident request the engine evicts first when it runs out of KV blocks mid-frame.

    Paused residents (not in ``run``) go first, latest-listed first; then the run list from its tail (the
    lowest-ranked running request), as vLLM preempts the last running request.
    """
    in_run = set(run)
    paused = [r for r in residents if r not in in_run]
    resident_set = set(residents)
    return [*reversed(paused), *(r for r in reversed(run) if r in resident_set)]


@dataclass(frozen=True, slots=True)
class DecisionCheck:
    """Problems with a decision against its snapshot (used by tests and the simulator's debug mode)."""

    errors: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return not self.errors


def check_decision(snapshot: Snapshot, decision: Decision) -> DecisionCheck:
    """A decision must only name live requests, each at most once per list, and never preempt a
    non-resident request or both run and reject the same one."""
    live = {r.request_id: r for r in snapshot.requests}
    errors: list[str] = []
    for label, ids in (
        ("run", decision.run),
        ("pace", tuple(p.request_id for p in decision.pace)),
        ("reject", decision.reject),
        ("demote", decision.demote),
        ("preempt", tuple(p.request_id for p in decision.preempt)),
    ):
        if len(set(ids)) != len(ids):
            errors.append(f"{label} lists a request twice")
        unknown = [i for i in ids if i not in live]
        if unknown:
            errors.append(f"{label} names unknown requests {unknown[:3]}")
    for p in decision.preempt:
        state = live.get(p.request_id)
        if state is not None and state.phase is not Phase.RUNNING:
            errors.append(f"preempt names {p.request_id}, which holds no GPU KV")
        if p.mode is PreemptMode.SWAP and snapshot.limits.swap_blocks_free <= 0:
            errors.append(f"preempt {p.request_id} by swap, but the engine has no swap space")
    both = set(decision.run) & set(decision.reject)
    if both:
        errors.append(f"requests both run and rejected: {sorted(both)[:3]}")
    preempted = {p.request_id for p in decision.preempt}
    if preempted & set(decision.reject):
        errors.append("requests both preempted and rejected")
    if preempted & set(decision.run):
        errors.append("requests both preempted and run")
    if decision.token_budget is not None and decision.token_budget < 1:
        errors.append("token_budget must be >= 1")
    return DecisionCheck(tuple(errors))
