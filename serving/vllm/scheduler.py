"""Tempo as vLLM's scheduler (``--scheduler-cls tempo.serving.vllm.scheduler.TempoScheduler``).

One mixin over vLLM's two schedulers (vLLM's own ``DiffusionScheduler`` / ``DiffusionAsyncScheduler`` is the
pattern): ``TempoSyncScheduler`` subclasses ``Scheduler`` (CPU: vLLM forces async scheduling off) and
``TempoAsyncScheduler`` subclasses ``AsyncScheduler`` (GPU default; subclassing the sync one there loses
the overlap). ``TempoScheduler`` builds whichever matches ``scheduler_config.async_scheduling``.

The mixin overrides only the hooks it must and leaves the rest to vLLM; the policy work is the adapter's
(``adapter.py``, no vLLM there). Each ``schedule()``:

1. when the policy is due (its frame, or an arrival, finish or preemption since), build the snapshot, call
   ``policy.decide`` and carry out the decision: rejections (``finish_requests(FINISHED_ABORTED)`` plus an
   ``EngineCoreOutput`` with ``FinishReason.ABORT`` and the reason as ``stop_reason``, so the client hears
   of it), preemptions (recompute: vLLM has no swap), demotions, run order, paces, token budget;
2. plan the step with the shared step rule and apply it with vLLM's levers: ``self.running`` reordered
   (who gets tokens first; its tail is vLLM's KV victim), ``next_decode_eligible_step`` for residents that
   sit this step out (paused, or ahead of their pace), the waiting queue's admissions for this step
   (``PlannedWaitingQueue``: requests held back do not block the ones behind), the token budget;
3. then vLLM's own ``schedule()``.

Finished requests (``_free_request``: exactly once per request, whatever the cause) become completion
records, queued for the background writer (no I/O in the step loop). First-token and per-token times are
recorded in ``_update_request_with_output`` (vLLM keeps no first-token time on ``Request``). The step-time
model starts from the engine profile and is fitted online to the measured steps (``timing.py``).

Configuration comes from ``TEMPO_SERVE_CONFIG`` (``config.py``), which ``tempo serve`` sets.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable, Iterator
from itertools import chain
from pathlib import Path
from typing import Any

from tempo.scheduler.interface import EngineLimits
from tempo.scheduler.registry import PolicyContext, make_policy
from tempo.scheduler.slo import SLOClass
from tempo.serving.profiles.profile import load_profile
from tempo.serving.sim.simulator import engine_timing
from tempo.serving.vllm.adapter import EngineAdapter, LiveRequest
from tempo.serving.vllm.completions import CompletionWriter
from tempo.serving.vllm.config import ServeConfig
from tempo.serving.vllm.local_bounds import local_bounds
from tempo.serving.vllm.metrics import engine_metrics
from tempo.serving.vllm.timing import StepTimer
from vllm.sampling_params import RequestOutputKind
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.request_queue import RequestQueue
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, FinishReason
from vllm.v1.request import Request, RequestStatus

log = logging.getLogger("tempo.serving.vllm")
METRICS_EVERY = 64  # steps between flushes of the step loop's counters to Prometheus


class PlannedWaitingQueue(RequestQueue):
    """vLLM's waiting queue, exposing only this step's planned admissions.

    ``peek`` / ``pop`` / ``bool`` see the admissions the step rule chose (in its order); ``len`` and
    iteration see every waiting request (vLLM counts them as unfinished work). Requests vLLM prepends
    (preempted, or skipped in a pass) rejoin the queue and wait for the next plan.
    """

    def __init__(self, existing: Iterable[Request] = ()) -> None:
        self._all: dict[str, Request] = {r.request_id: r for r in existing}
        self._admit: deque[Request] = deque()

    def set_admissions(self, requests: Iterable[Request]) -> None:
        present = self._all
        self._admit = deque(r for r in requests if r.request_id in present)

    def add_request(self, request: Request) -> None:
        self._all[request.request_id] = request

    def pop_request(self) -> Request:
        request = self._admit.popleft()
        del self._all[request.request_id]
        return request

    def peek_request(self) -> Request:
        if not self._admit:
            raise IndexError("peek from an empty queue")
        return self._admit[0]

    def prepend_request(self, request: Request) -> None:
        self._all[request.request_id] = request

    def prepend_requests(self, requests: Iterable[Request]) -> None:
        for request in requests:
            self._all[request.request_id] = request

    def remove_request(self, request: Request) -> None:
        self.remove_requests((request,))

    def remove_requests(self, requests: Iterable[Request]) -> None:
        gone = {r.request_id for r in requests}
        for rid in gone:
            self._all.pop(rid, None)
        if any(r.request_id in gone for r in self._admit):
            self._admit = deque(r for r in self._admit if r.request_id not in gone)

    def __bool__(self) -> bool:
        return bool(self._admit)

    def __len__(self) -> int:
        return len(self._all)

    def __iter__(self) -> Iterator[Request]:
        return iter(list(self._all.values()))


class TempoSchedulerMixin:
    """The Tempo hooks over a vLLM scheduler (see the module docstring). Mixed in before the vLLM base."""

    # set by the vLLM base class
    running: list[Request]
    waiting: Any
    kv_holding_waiting: Any
    requests: dict[str, Request]
    current_step: int
    max_num_scheduled_tokens: int
    max_num_running_reqs: int
    block_size: int
    kv_cache_manager: Any
    kv_cache_config: Any
    vllm_config: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        config = self.tempo_config = ServeConfig.from_env()
        LiveRequest.running_status = RequestStatus.RUNNING
        bounds = local_bounds(config.bounds_model, config.quantile, config.local_bounds)
        self.tempo_metrics = engine_metrics()
        self.tempo_job_outlook = None
        job_outlook: Any = bounds.job_graphs
        if config.estimator_url:  # jobs learned by the service from every replica's records; ours as fallback
            from tempo.serving.vllm.job_outlook import ServiceJobOutlook

            job_outlook = self.tempo_job_outlook = ServiceJobOutlook(
                config.estimator_url, bounds.job_graphs, timeout_s=config.estimator_timeout_s,
                on_answer=self.tempo_metrics.observe_job_outlook)
        context = PolicyContext(job_profile=bounds.job_profile, job_graphs=job_outlook)
        policy = make_policy(config.policy, context, **config.policy_params)
        self.tempo_budget = int(self.max_num_scheduled_tokens)
        slots = config.step_slots or int(self.max_num_running_reqs)

        def fallback(cls: SLOClass, max_tokens: int | None) -> Any:
            return bounds.ladder(cls, config.default_app, max_tokens, fallback=True)

        self.tempo = EngineAdapter(policy, config.slo_defaults(), self.tempo_budget, slots, fallback,
                                   config.job_ttl_s, learn_job=bounds.job_graphs.add)
        self.tempo_timer = StepTimer(engine_timing(load_profile(config.profile)), self.tempo_budget)
        self.waiting = PlannedWaitingQueue(self.waiting)
        self._tempo_policy_errors = 0
        store = None
        if config.redis_url:
            from tempo.estimator.store import Store

            store = Store(config.redis_url, config.key_prefix, config.stream, timeout_s=0.5,
                          stream_maxlen=config.stream_maxlen, dedupe_ttl_s=config.dedupe_ttl_s)
        self.tempo_writer = CompletionWriter(
            store, config.record_buffer, Path(config.spill_path) if config.spill_path else None,
            config.store_prompt_text, on_record=self.tempo_metrics.observe_record)
        self._tempo_aborts: list[tuple[Request, str]] = []  # rejected: their outputs go with the next update
        self._tempo_refuse: list[LiveRequest] = []  # to reject at the next schedule (calls of aborted jobs)
        self._tempo_now = time.time()
        self._tempo_step_started = time.perf_counter()
        self._tempo_policy_preempting = False
        self._tempo_flushed: dict[str, int] = {}
        eos = getattr(self.vllm_config.model_config.hf_text_config, "eos_token_id", None)
        self._tempo_eos = int((eos[0] if isinstance(eos, list) and eos else eos) or 0)
        log.info("Tempo scheduler: policy %s %s, %d slots per step, budget %d, Redis %s", config.policy,
                 config.policy_params or "", slots, self.tempo_budget, "on" if store else "off")

    # ------------------------------------------------------------------ arrivals
    def add_request(self, request: Request) -> None:
        existing = request.request_id in self.requests
        super().add_request(request)  # type: ignore[misc]
        if existing:
            return  # a streaming-input continuation of a request we already track
        live = self.tempo.add(request)
        reason = self.tempo.refused_at_arrival(live)
        if reason is not None:
            live.rejected = reason
            self._tempo_refuse.append(live)

    # ------------------------------------------------------------------ the step
    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        now = time.time()
        tempo = self.tempo
        if self._tempo_refuse:
            refuse, self._tempo_refuse = self._tempo_refuse, []
            self._tempo_reject([r for r in refuse if not r.done])
        if tempo.due():
            self._tempo_decide(now)
        plan = tempo.plan(self.running, now)
        eligible = self.current_step + 2  # schedule() advances current_step first: this skips one call
        for request in plan.skip:
            if request.next_decode_eligible_step < eligible:
                request.next_decode_eligible_step = eligible
        self.running = plan.running_order
        self.waiting.set_admissions(plan.admit)
        tempo.stats.held_waiting += len(self.waiting) - len(plan.admit)
        self.max_num_scheduled_tokens = plan.token_budget
        if self.current_step % METRICS_EVERY == 0:
            self._tempo_flush_metrics()
        self._tempo_step_started = started
        return super().schedule(*args, **kwargs)  # type: ignore[misc]

    def _tempo_decide(self, now: float) -> None:
        tempo = self.tempo
        t0 = time.perf_counter()
        pool = self.kv_cache_manager.block_pool
        limits = EngineLimits(
            token_budget=self.tempo_budget,
            max_running=tempo.slots,
            kv_blocks_total=int(self.kv_cache_config.num_blocks),
            kv_blocks_free=int(pool.get_num_free_blocks()),
            block_size=int(self.block_size),
        )
        snapshot = tempo.snapshot(self.running, chain(self.waiting, self.kv_holding_waiting), limits,
                                  self.tempo_timer.timing(), self.current_step, now)
        tempo.stats.snapshot_s_total += time.perf_counter() - t0
        try:
            decision = tempo.decide(snapshot)
        except Exception:  # a policy bug must not take the engine down (vLLM stops on a scheduler error)
            self.tempo_metrics.policy_errors.inc()
            self._tempo_policy_errors += 1
            if self._tempo_policy_errors in (1, 10, 100) or self._tempo_policy_errors % 1000 == 0:
                log.exception("tempo: policy decision %d raised; this step keeps the last plan",
                              self._tempo_policy_errors)
            return
        self.tempo_metrics.decisions.inc()
        self.tempo_metrics.decision_seconds.observe(tempo.stats.decision_s[-1])
        applied = tempo.apply(decision, now)
        if applied.reject:
            self._tempo_reject(applied.reject)
        if applied.preempt:
            victims = {r.id for r in applied.preempt}
            self.running = [q for q in self.running if q.request_id not in victims]
            timestamp = time.monotonic()
            self._tempo_policy_preempting = True
            try:
                for r in applied.preempt:
                    self._preempt_request(r.req, timestamp)
            finally:
                self._tempo_policy_preempting = False
            self.tempo_metrics.preemptions.labels("policy").inc(len(applied.preempt))

    def _tempo_reject(self, rejected: list[LiveRequest]) -> None:
        """Finish rejected requests now; the client gets ``finish_reason: abort`` and the reason."""
        reqs = [r.req for r in rejected]
        finished = self.finish_requests([q.request_id for q in reqs], RequestStatus.FINISHED_ABORTED)
        reasons = {r.id: r.rejected or "tempo: rejected" for r in rejected}
        for request in finished:
            self._tempo_aborts.append((request, reasons[request.request_id]))
        for r in rejected:
            self.tempo_metrics.rejections.labels(r.slo.slo_class.value).inc()

    def update_from_output(self, scheduler_output: Any, model_runner_output: Any) -> dict[int, Any]:
        self._tempo_now = time.time()
        elapsed = time.perf_counter() - self._tempo_step_started
        decodes = kv = prefill = 0
        requests = self.requests
        for rid, n in scheduler_output.num_scheduled_tokens.items():
            request = requests.get(rid)
            if request is None:
                continue
            if n == 1 and request.num_output_tokens > 0:
                decodes += 1
                kv += request.num_computed_tokens
            else:
                prefill += n
        self.tempo_timer.observe(decodes, kv, prefill, elapsed)
        outputs: dict[int, Any] = super().update_from_output(scheduler_output, model_runner_output)  # type: ignore[misc]
        if self._tempo_aborts:
            aborts, self._tempo_aborts = self._tempo_aborts, []
            for request, reason in aborts:
                eco = outputs.get(request.client_index)
                if eco is None:
                    eco = outputs[request.client_index] = EngineCoreOutputs()
                eco.outputs.append(EngineCoreOutput(
                    request_id=request.request_id, new_token_ids=self._tempo_closing_tokens(request),
                    finish_reason=FinishReason.ABORT, stop_reason=reason, events=request.take_events(),
                    trace_headers=request.trace_headers))
        return outputs

    def _tempo_closing_tokens(self, request: Request) -> list[int]:
        """Tokens of a rejection's final output: none, except for a streamed request with no token yet, which
        gets one end-of-sequence token (invisible text): vLLM's streaming path drops a final chunk that has
        neither text nor tokens before the first token, and the client would never see the reason."""
        params = request.sampling_params
        if request.num_output_tokens > 0 or params is None or params.output_kind is RequestOutputKind.FINAL_ONLY:
            return []
        return [self._tempo_eos]

    def _update_request_with_output(self, request: Request, new_token_ids: list[int],
                                    *args: Any, **kwargs: Any) -> tuple[list[int], bool]:
        new_ids, stopped = super()._update_request_with_output(request, new_token_ids, *args, **kwargs)  # type: ignore[misc]
        live = self.tempo.live.get(request.request_id)
        if live is not None and new_ids:
            self.tempo.on_tokens(live, len(new_ids), self._tempo_now)
        return new_ids, stopped

    def _preempt_request(self, request: Request, *args: Any, **kwargs: Any) -> None:
        super()._preempt_request(request, *args, **kwargs)  # type: ignore[misc]
        if not self._tempo_policy_preempting:
            self.tempo.stats.engine_preemptions += 1
            self.tempo.dirty = True
            self.tempo_metrics.preemptions.labels("engine").inc()

    def _free_request(self, request: Request, *args: Any, **kwargs: Any) -> Any:
        live = self.tempo.live.get(request.request_id)
        if live is not None:
            reason = request.get_finished_reason()
            record = self.tempo.finish(live, str(reason) if reason is not None else "abort", time.time())
            record["model"] = self.tempo_config.served_model
            self.tempo_writer.put(record)
        return super()._free_request(request, *args, **kwargs)  # type: ignore[misc]

    def _tempo_flush_metrics(self) -> None:
        """Step-loop counters to Prometheus, as deltas (every ``METRICS_EVERY`` steps)."""
        stats, flushed, metrics = self.tempo.stats, self._tempo_flushed, self.tempo_metrics
        metrics.skips.inc(stats.paced_skips - flushed.get("paced_skips", 0))
        flushed["paced_skips"] = stats.paced_skips
        for cls, value in stats.demotions_by_class.items():
            metrics.demotions.labels(cls).inc(value - flushed.get(f"demotions:{cls}", 0))
            flushed[f"demotions:{cls}"] = value
        writer = self.tempo_writer.counters()
        for state in ("written", "duplicates", "dropped", "spilled"):
            metrics.records.labels(state).inc(writer[state] - flushed.get(state, 0))
            flushed[state] = writer[state]

    def tempo_report(self) -> dict[str, Any]:
        """What the adapter decided and applied, the writer's counters and the fitted step-time model."""
        timing = self.tempo_timer.timing()
        return {"policy": self.tempo.policy.describe(), "stats": self.tempo.stats.to_dict(),
                "records": self.tempo_writer.counters(), "steps": self.current_step,
                "timing": {"base_s": timing.base_s, "per_seq_s": timing.per_seq_s,
                           "per_kv_token_s": timing.per_kv_token_s, "per_prefill_token_s": timing.per_prefill_token_s,
                           "recent_step_s": timing.recent_step_s, "fitted_steps": self.tempo_timer.steps},
                "bad_fields": self.tempo.bad_fields,
                "job_outlooks": dict(self.tempo_job_outlook.answered) if self.tempo_job_outlook else None}

    def shutdown(self) -> None:
        self._tempo_flush_metrics()
        self.tempo_writer.stop()
        if self.tempo_job_outlook is not None:
            self.tempo_job_outlook.close()
        super().shutdown()  # type: ignore[misc]


class TempoSyncScheduler(TempoSchedulerMixin, Scheduler):
    """Tempo over vLLM's synchronous scheduler (CPU, or ``--no-async-scheduling``)."""


class TempoAsyncScheduler(TempoSchedulerMixin, AsyncScheduler):
    """Tempo over vLLM's async scheduler (the GPU default: keeps scheduling overlapped with execution)."""


class TempoScheduler:
    """What ``--scheduler-cls`` names: builds the variant that matches ``async_scheduling``, as vLLM itself
    picks ``DiffusionScheduler`` or ``DiffusionAsyncScheduler`` (vLLM calls it with keyword arguments and
    checks no type)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:  # type: ignore[misc]
        return variant_for(kwargs.get("vllm_config", args[0] if args else None))(*args, **kwargs)


def variant_for(vllm_config: Any) -> type[TempoSchedulerMixin]:
    """The Tempo scheduler class for a vLLM config: async when vLLM schedules asynchronously."""
    asynchronous = bool(getattr(getattr(vllm_config, "scheduler_config", None), "async_scheduling", False))
    return TempoAsyncScheduler if asynchronous else TempoSyncScheduler
