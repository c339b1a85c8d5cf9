"""Replay a workload file against a running ``tempo serve`` and observe what a client sees.

Every request is sent at its arrival time (a compound call when the calls it depends on have finished,
as the simulator releases them) as a streaming request with the SLO fields of
``tempo serve`` in ``vllm_xargs``. Lengths are forced (``max_tokens`` = the workload's length,
``ignore_eos``, as ``vllm bench`` does) or natural (``natural_lengths``: the model stops by itself,
``max_tokens`` is a cap; requests without text, such as compound calls, stay forced). Token times are
taken at the client from the stream (each chunk carries the cumulative usage); the outcomes feed
``tempo.scheduler.goodput.account`` like the simulator's.

Forced-length prompts are token ids of the workload's prompt length (``/v1/completions``: the served
model's tokenizer would count the workload's text differently); natural-length prompts are the workload's
text as a user message (``/v1/chat/completions``: an instruct model answers it as it would in use).

The client is aiohttp (a C HTTP parser): under overload the load generator shares two cores with the
engine, and with httpx's pure-Python streaming ``tempo soak`` at 4x lagged seconds behind its schedule
(docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from tempo.scheduler.goodput import RequestOutcome
from tempo.serving.vllm import loop_lag
from tempo.serving.workloads.format import WorkloadRequest

TOKEN_RANGE = (100, 4000)  # synthetic prompt ids: valid in every served model's vocabulary here
STALL_S = 0.02  # a wake-up of the client's loop this late is recorded as its own stall


@dataclass(frozen=True)
class ReplayConfig:
    url: str
    model: str  # the served model name
    natural_lengths: bool = False
    max_tokens_cap: int = 2048  # natural lengths: the cap
    # forced lengths sent with the prompt's text (chat) where the request has one, so that completion
    # records carry prompt sketches and true lengths (what retraining and its gate learn from)
    forced_with_text: bool = False
    max_model_len: int = 4096  # forced lengths: prompts are cut so that prompt + output fit the context
    request_timeout_s: float = 3600.0
    start_delay_s: float = 0.5
    stop_at_s: float | None = None  # cancel whatever is still running this long after the start (measurements)
    live: LiveReplay | None = None  # another thread's view of a replay in progress, and its stop switch
    max_connections: int = 4096


@dataclass
class LiveReplay:
    """Shared with the thread that runs a replay: ``t0`` (monotonic seconds, what ``sent_s`` counts from)
    and ``observed`` fill in as it runs; ``stop`` set: no more requests are sent, those in flight finish."""

    stop: threading.Event = field(default_factory=threading.Event)
    t0: float | None = None
    observed: dict[str, Observed] = field(default_factory=dict)


@dataclass
class Observed:
    """What the client saw of one request."""

    request_id: str
    sent_s: float | None = None
    token_times_s: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | None = None
    status: int | None = None  # HTTP status; 503: refused by the front end
    status_s: float | None = None  # when the status arrived
    ended_s: float | None = None  # when the answer ended (finished, refused, failed or cut)
    reason: str | None = None  # a refusal's x-tempo-request-dropped-reason
    error: str | None = None
    connect_failed: bool = False  # no connection could be made (the server is down or not listening)
    text: str = ""
    prompt_tokens: int = 0  # as the server counted them (usage), else as sent
    late_s: float | None = None  # how late the client's loop sent it (after its arrival or its stage's release)


@dataclass
class ReplayResult:
    outcomes: list[RequestOutcome]
    observed: dict[str, Observed]
    wall_s: float
    refused: int = 0
    rejected: int = 0
    errors: int = 0
    never_sent: int = 0  # later calls of a job that failed
    # (start, end, seconds of it waiting for a core) from t0 of the client's own loop stalls over STALL_S:
    # what it timed across them has its own lag added to the server's
    loop_stalls_s: list[tuple[float, float, float | None]] = field(default_factory=list)


def synthetic_prompt(request_id: str, tokens: int) -> list[int]:
    seed = int.from_bytes(hashlib.sha256(request_id.encode()).digest()[:8], "big")
    rng = random.Random(seed)
    return [rng.randrange(*TOKEN_RANGE) for _ in range(max(1, tokens))]


def slo_xargs(w: WorkloadRequest) -> dict[str, Any]:
    fields: dict[str, Any] = {"slo_class": w.slo_class.value, "app": w.app}
    for name in ("ttft_slo_s", "tbt_slo_s", "deadline_s", "job_deadline_s", "job_id", "stage"):
        value = getattr(w, name)
        if value is not None:
            fields[name] = value
    return fields


def served_prompt_tokens(w: WorkloadRequest, max_model_len: int) -> int:
    """The prompt length sent for a forced-length request: the workload's, cut so prompt + output fit."""
    return max(1, min(w.prompt_tokens, max_model_len - w.output_tokens - 8))


def request_body(w: WorkloadRequest, config: ReplayConfig) -> dict[str, Any]:
    body: dict[str, Any] = {"model": config.model, "stream": True, "temperature": 0.0,
                            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
                            "vllm_xargs": slo_xargs(w)}
    if config.natural_lengths and w.prompt:
        body["messages"] = [{"role": "user", "content": w.prompt}]
        body["max_tokens"] = config.max_tokens_cap
    elif config.forced_with_text and w.prompt:  # the workload's length, on the prompt's own text
        body["messages"] = [{"role": "user", "content": w.prompt}]
        body["max_tokens"] = max(1, min(w.output_tokens, config.max_tokens_cap))
        body["ignore_eos"] = True
    else:  # forced (also natural-length runs' calls that carry no text: compound calls have counts only)
        body["prompt"] = synthetic_prompt(w.id, served_prompt_tokens(w, config.max_model_len))
        body["max_tokens"] = max(1, min(w.output_tokens, config.max_model_len - len(body["prompt"]) - 8))
        body["ignore_eos"] = True
    return body


async def _send(http: aiohttp.ClientSession, w: WorkloadRequest, config: ReplayConfig, t0: float,
                seen: Observed) -> Observed:
    """Stream one request, filling ``seen`` as tokens arrive (a cancelled replay keeps what came)."""
    body = request_body(w, config)
    seen.sent_s = time.monotonic() - t0
    chat = "messages" in body
    seen.prompt_tokens = w.prompt_tokens if chat else len(body["prompt"])
    count = 0
    try:
        async with http.post("/v1/chat/completions" if chat else "/v1/completions", json=body,
                             headers={"X-Request-Id": w.id}) as response:
            seen.status = response.status
            seen.status_s = time.monotonic() - t0
            if response.status != 200:
                seen.reason = response.headers.get("x-tempo-request-dropped-reason")
                seen.error = (await response.read()).decode(errors="replace")[:300]
                seen.ended_s = time.monotonic() - t0
                return seen
            async for line in response.content:
                if not line.startswith(b"data: {"):
                    continue
                now = time.monotonic() - t0
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or {}
                seen.prompt_tokens = int(usage.get("prompt_tokens") or seen.prompt_tokens)
                total = int(usage.get("completion_tokens") or count)
                for choice in chunk.get("choices") or []:
                    seen.text += (choice.get("delta") or {}).get("content") or "" if chat else choice.get("text") or ""
                    if choice.get("finish_reason"):
                        seen.finish_reason = choice["finish_reason"]
                        seen.stop_reason = choice.get("stop_reason")
                if total > count:
                    seen.token_times_s.extend([now] * (total - count))
                    count = total
    except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
        seen.connect_failed = True
        seen.error = f"{type(exc).__name__}: {exc}"[:300]
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:  # ValueError: a malformed stream
        seen.error = f"{type(exc).__name__}: {exc}"[:300]
    seen.ended_s = time.monotonic() - t0
    return seen


async def replay(workload: Sequence[WorkloadRequest], config: ReplayConfig,
                 progress: Any = None) -> ReplayResult:
    """Send the workload in real time; returns when every request finished or was refused or rejected."""
    by_id = {w.id: w for w in workload}
    dependents: dict[str, list[str]] = defaultdict(list)
    waiting_on = {w.id: len(w.depends_on) for w in workload}
    for w in workload:
        for dep in w.depends_on:
            dependents[dep].append(w.id)
    observed: dict[str, Observed] = {} if config.live is None else config.live.observed
    failed_jobs: set[str] = set()
    released: dict[str, float] = {}
    connector = aiohttp.TCPConnector(limit=config.max_connections)
    timeout = aiohttp.ClientTimeout(total=config.request_timeout_s, sock_connect=30.0)
    started = time.perf_counter()
    async with aiohttp.ClientSession(config.url, connector=connector, timeout=timeout,
                                     read_bufsize=2**20) as http:
        t0 = time.monotonic() + config.start_delay_s
        live = config.live
        if live is not None:
            live.t0 = t0
        tasks: set[asyncio.Task[None]] = set()
        sending: set[asyncio.Task[Any]] = set()
        stalls: list[tuple[float, float, float | None]] = []
        waited = [loop_lag.run_queue_wait_s()]

        def stalled(woke: float, lag: float) -> None:
            before, waited[0] = waited[0], loop_lag.run_queue_wait_s()
            if lag > STALL_S:
                cpu_wait = None if before is None or waited[0] is None else round(waited[0] - before, 4)
                stalls.append((round(woke - lag - t0, 4), round(woke - t0, 4), cpu_wait))

        watcher = asyncio.create_task(loop_lag.watch(stalled))

        async def run(w: WorkloadRequest, at_s: float) -> None:
            await asyncio.sleep(max(0.0, t0 + at_s - time.monotonic()))
            if (w.job_id is not None and w.job_id in failed_jobs) or (live is not None and live.stop.is_set()):
                return
            task = asyncio.current_task()
            if task is not None:
                sending.add(task)
                task.add_done_callback(sending.discard)
            released[w.id] = time.monotonic() - t0
            seen = observed[w.id] = Observed(w.id, late_s=released[w.id] - at_s)
            await _send(http, w, config, t0, seen)
            if progress is not None:
                progress()
            ok = seen.status == 200 and seen.finish_reason in ("stop", "length") and seen.error is None
            if not ok and w.job_id is not None:
                failed_jobs.add(w.job_id)
            for child in dependents.get(w.id, ()):
                waiting_on[child] -= 1
                if waiting_on[child] == 0 and ok:
                    spawn(by_id[child], time.monotonic() - t0)

        def spawn(w: WorkloadRequest, at_s: float) -> None:
            task = asyncio.create_task(run(w, at_s))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        for w in workload:
            if not w.depends_on:
                spawn(w, w.arrival_s)
        if live is not None:
            async def stop_sending() -> None:
                while not live.stop.is_set():
                    await asyncio.sleep(0.2)
                for task in list(tasks):
                    if task not in sending:
                        task.cancel()

            stop_switch = asyncio.create_task(stop_sending())
        if config.stop_at_s is not None:
            async def stop() -> None:
                await asyncio.sleep(max(0.0, t0 + config.stop_at_s - time.monotonic()))
                for task in list(tasks):
                    task.cancel()

            stopper = asyncio.create_task(stop())
        while tasks:
            await asyncio.gather(*list(tasks), return_exceptions=True)
        if config.stop_at_s is not None:
            stopper.cancel()
        if live is not None:
            stop_switch.cancel()
        watcher.cancel()
    wall = time.perf_counter() - started
    result = _result(workload, observed, released, wall, config)
    result.loop_stalls_s = stalls
    return result


def _result(workload: Sequence[WorkloadRequest], observed: dict[str, Observed], released: dict[str, float],
            wall: float, config: ReplayConfig) -> ReplayResult:
    outcomes: list[RequestOutcome] = []
    job_arrival = {w.job_id: w.arrival_s for w in workload if w.job_id is not None and not w.depends_on}
    result = ReplayResult(outcomes, observed, wall)
    for w in workload:
        seen = observed.get(w.id)
        arrival = released.get(w.id, w.arrival_s)
        if seen is None:
            result.never_sent += 1
            times: tuple[float, ...] = ()
            finished = False
        else:
            finished = seen.status == 200 and seen.finish_reason in ("stop", "length") and seen.error is None
            times = tuple(max(t, arrival) for t in seen.token_times_s) if finished else ()
            if seen.status == 503:
                result.refused += 1
            elif seen.finish_reason == "abort":
                result.rejected += 1
            elif not finished:
                result.errors += 1
        if finished and not times:
            finished = False
        outcomes.append(RequestOutcome(
            request_id=w.id, slo=w.slo(), arrival_s=arrival,
            prompt_tokens=observed[w.id].prompt_tokens if w.id in observed else w.prompt_tokens,
            token_times_s=times, finished=finished, job_id=w.job_id,
            job_arrival_s=job_arrival.get(w.job_id) if w.job_id is not None else None))
    return result


async def scrape_metrics(url: str) -> dict[str, float]:
    """Tempo's and vLLM's counters from ``/metrics`` (``parse_metrics``)."""
    async with aiohttp.ClientSession(url, timeout=aiohttp.ClientTimeout(total=10)) as http, \
            http.get("/metrics") as response:
        return parse_metrics(await response.text())


def parse_metrics(text: str) -> dict[str, float]:
    """Tempo's and vLLM's series of a Prometheus text exposition, summed over labels by name (and kept by
    label)."""
    out: dict[str, float] = defaultdict(float)
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        try:
            number = float(value)
        except ValueError:
            continue
        name = name_labels.split("{", 1)[0]
        if name.startswith(("tempo_", "vllm:")):
            out[name] += number
            if "{" in name_labels:
                out[name_labels] = number
    return dict(out)
