"""``tempo chaos``: the fault matrix on a running stack under steady mixed load, and its table.

The stack is real: a Redis of its own (append-only, so a restart keeps the data), the estimator service
(bootstrapped with the cached length model), the fault proxy in front of it, and ``tempo serve`` with
the Tempo policy on the tiny model. One replay of a mixed workload (chat, deadline and compound jobs;
forced lengths on the prompts' text, so records carry sketches) runs in a thread for the whole matrix;
the faults follow one another: inject, hold, heal, wait until the fault's recovery signals hold, settle.

Each row counts the requests *sent* during its window: answered, 4xx, 5xx, aborted mid-answer, refused
at connect; completions expected (answered requests), recorded in Redis and duplicated; and the recovery
time (heal -> every signal holds). Afterwards the learner's committed state must hold each learnable
record exactly once.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from tempo.serving.chaos.faults import FAULTS, ChaosStack, Fault
from tempo.serving.chaos.ledger import RecordLedger

from tempo.errors import TempoError

ADMIN_TOKEN = "chaos-admin"
CALLS = re.compile(r'^tempo_estimator_calls_total\{result="(\w+)"\} (\S+)$', re.M)
GRACE_S = 1.0  # a record is due this long after its answer


@dataclass
class ChaosConfig:
    faults: list[str] = field(default_factory=lambda: list(FAULTS))
    hold_s: float = 10.0
    settle_s: float = 5.0
    rps: float = 3.0
    model: str = "tiny"
    seed: int = 0
    recovery_timeout_s: float = 180.0
    out: Path = Path("out/chaos")

    def validate(self) -> None:
        unknown = [f for f in self.faults if f not in FAULTS]
        if unknown:
            raise TempoError(f"unknown faults {', '.join(unknown)}; known: {', '.join(FAULTS)}")
        if self.hold_s <= 0 or self.settle_s < 0 or self.rps <= 0:
            raise TempoError("--hold and --rps must be > 0, --settle >= 0")


def chaos_workload(rps: float, duration_s: float, seed: int, **slo: float) -> list[Any]:
    """A mixed 1:1:1 workload cut to what the tiny model serves in seconds (compound calls 256/96 tokens,
    text requests up to 2,000 characters and 256 output tokens); ``slo``: WorkloadSpec's SLO fields."""
    from tempo.serving.workloads.builder import WorkloadSpec, build_workload

    from tempo.demo import demo_shape

    spec = WorkloadSpec(rps=rps, duration_s=duration_s, seed=seed, **slo)  # type: ignore[arg-type]
    return demo_shape(build_workload(spec), answer_cap=256)


def estimator_calls(server_url: str) -> dict[str, float]:
    """The front end's estimator calls by result (ok, fallback, local); empty when serve does not answer."""
    try:
        text = httpx.get(f"{server_url}/metrics", timeout=2).text
    except httpx.HTTPError:
        return {}
    return {result: float(value) for result, value in CALLS.findall(text)}


def _ok_calls(server_url: str) -> float:
    return estimator_calls(server_url).get("ok", 0.0)


def _probe(server_url: str, served: str, i: int) -> bool:
    try:
        response = httpx.post(f"{server_url}/v1/completions", timeout=10, headers={"X-Request-Id": f"probe-{i}"},
                              json={"model": served, "prompt": [101, 102, 103], "max_tokens": 2})
        return response.status_code == 200
    except httpx.HTTPError:
        return False


class Recovery:
    """Polls the fault's signals after the heal until they all hold; returns when each first held."""

    def __init__(self, stack: ChaosStack, ledger: RecordLedger, live: Any, served: str) -> None:
        self.stack, self.ledger, self.live, self.served = stack, ledger, live, served
        self.probes = 0

    def records_caught_up(self) -> bool:
        if not self.ledger.refresh():
            return False
        t0 = self.live.t0 or 0.0
        due = time.monotonic() - t0 - GRACE_S
        return all(self.ledger.records.get(o.request_id) for o in list(self.live.observed.values())
                   if _answered(o) and o.token_times_s and o.token_times_s[-1] < due)

    def learner_caught_up(self, mark: str) -> bool:
        """The learner has committed every record written before ``mark`` (the stream's last id at the heal:
        the backlog the fault left); exactly-once is checked at the end, when the load has stopped."""
        committed = self.ledger.committed_id()
        return committed is not None and _id(committed) >= _id(mark)

    def wait(self, fault: Fault, timeout_s: float) -> dict[str, float | None]:
        healed = time.monotonic()
        ok_before = _ok_calls(self.stack.server.url)
        self.ledger.refresh()
        mark = self.ledger.last_id
        held: dict[str, float | None] = dict.fromkeys(fault.signals)
        checks = {
            "serving": lambda: _probe(self.stack.server.url, self.served, self._next_probe()),
            "estimator": lambda: _ok_calls(self.stack.server.url) > ok_before,
            "records": self.records_caught_up,
            "learner": lambda: self.learner_caught_up(mark),
            "model": lambda: self.stack.estimator_version() == self.stack.active_version,
        }
        while any(v is None for v in held.values()) and time.monotonic() - healed < timeout_s:
            for name in held:
                if held[name] is None and checks[name]():
                    held[name] = round(time.monotonic() - healed, 2)
            time.sleep(0.2)
        return held

    def _next_probe(self) -> int:
        self.probes += 1
        return self.probes


def _id(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


def _answered(o: Any) -> bool:
    return o.status == 200 and o.finish_reason in ("stop", "length") and o.error is None


def classify(o: Any) -> str:
    """answered, 4xx, 5xx, aborted (cut during the answer) or refused (no connection)."""
    if _answered(o):
        return "answered"
    if o.status is not None and o.status >= 500:
        return "5xx"
    if o.status is not None and o.status >= 400:
        return "4xx"
    if o.status is None and o.connect_failed:
        return "refused"
    return "aborted"


def run_chaos(config: ChaosConfig, console: Any) -> dict[str, Any]:
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from tempo.estimator.store import Store
    from tempo.serving.bench.engine_client import LiveReplay, ReplayConfig, replay
    from tempo.serving.chaos.proxy import FaultProxy
    from tempo.serving.vllm.launch import ManagedServer
    from tempo.serving.vllm.server import resolve_model
    from tempo.serving.vllm.stack import EstimatorService, LocalRedis, Stack, bootstrap_artifact

    config.validate()
    logs = config.out / "logs"
    served = resolve_model(config.model)[1]
    faults = [FAULTS[name] for name in config.faults]
    # the arrivals outlast the matrix (a serve restart takes tens of seconds); sending stops at its end
    horizon = 300 + len(faults) * (config.hold_s + config.settle_s + config.recovery_timeout_s)
    workload = chaos_workload(config.rps, horizon, config.seed)
    rows: list[dict[str, Any]] = []
    with Stack() as stack, Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                                    console=console, transient=True) as progress:
        task = progress.add_task("starting Redis (append-only)")
        redis = stack.add(LocalRedis(persist=True))
        progress.update(task, description="length model (cached after the first run)")
        artifact = bootstrap_artifact()
        progress.update(task, description="estimator service and the fault proxy")
        estimator = stack.add(EstimatorService(redis.url, artifact, logs / "estimator.log", ADMIN_TOKEN))
        proxy = stack.add(FaultProxy(estimator.url, logs / "proxy.log"))
        progress.update(task, description=f"tempo serve --model {config.model} --policy tempo")
        server = stack.add(ManagedServer(["--model", config.model, "--policy", "tempo", "--redis-url", redis.url,
                                          "--estimator-url", proxy.url], logs / "serve.log"))
        server.start()
        store = stack.add(Store(redis.url, timeout_s=5.0))
        work = config.out / "work"
        work.mkdir(parents=True, exist_ok=True)
        chaos = ChaosStack(redis, estimator, proxy, server, store, ADMIN_TOKEN, work, store.active_version())
        ledger = RecordLedger(store)
        live = LiveReplay()
        replay_config = ReplayConfig(server.url, served, forced_with_text=True, max_tokens_cap=256,
                                     request_timeout_s=120.0, live=live)
        result: dict[str, Any] = {}

        def load() -> None:
            result["replay"] = asyncio.run(replay(workload, replay_config))

        loader = threading.Thread(target=load, name="tempo-chaos-load", daemon=True)
        loader.start()
        while live.t0 is None:
            time.sleep(0.05)
        recovery = Recovery(chaos, ledger, live, served)
        time.sleep(max(0.0, live.t0 - time.monotonic()) + 10.0)  # warm up: the load reaches steady state
        for fault in faults:
            progress.update(task, description=f"{fault.name}: {fault.what}")
            calls_before = estimator_calls(server.url)
            start = time.monotonic()
            try:
                notes = fault.inject(chaos)
            except TempoError as exc:  # the fault could not be injected: said in the row, the matrix goes on
                notes = {"not_injected": str(exc)}
            time.sleep(config.hold_s)
            healed = time.monotonic()
            notes.update(fault.heal(chaos))
            signals = recovery.wait(fault, config.recovery_timeout_s)
            time.sleep(config.settle_s)
            window = (start - live.t0, time.monotonic() - live.t0)
            calls_after = estimator_calls(server.url)
            notes["estimator_calls"] = {k: int(v - calls_before.get(k, 0.0)) for k, v in calls_after.items()
                                        if v > calls_before.get(k, 0.0)}
            rows.append({"fault": fault.name, "what": fault.what, "window_s": window,
                         "held_s": round(healed - start, 2), "signals_s": signals, "notes": notes})
        progress.update(task, description="load stopped: waiting for the requests in flight")
        live.stop.set()
        loader.join(300)
        progress.update(task, description="waiting for the last records and the learner")
        final = recovery.wait(Fault("end", "", lambda s: {}, lambda s: {}, ("records", "learner")), 120)
        applied, pending = ledger.learner_state()
        report = summarize(rows, live.observed, ledger, applied, pending, final)
        report["config"] = {"faults": config.faults, "hold_s": config.hold_s, "settle_s": config.settle_s,
                            "rps": config.rps, "model": config.model, "seed": config.seed}
        report["proxy_answers"] = proxy.counts
    config.out.mkdir(parents=True, exist_ok=True)
    return report


def summarize(rows: list[dict[str, Any]], observed: dict[str, Any], ledger: RecordLedger,
              applied: int | None, pending: int | None, final: dict[str, float | None]) -> dict[str, Any]:
    """The table: per fault window and in total."""
    seen = [o for o in observed.values() if o.sent_s is not None]

    def counts(selected: list[Any]) -> dict[str, Any]:
        kinds = {k: 0 for k in ("answered", "4xx", "5xx", "aborted", "refused")}
        for o in selected:
            kinds[classify(o)] += 1
        answered = {o.request_id for o in selected if _answered(o)}
        failed = {o.request_id for o in selected if not _answered(o)}
        recorded = ledger.recorded(answered)
        return {"sent": len(selected), **kinds, "expected": len(answered), "recorded": recorded,
                "lost": len(answered) - recorded, "duplicated": ledger.duplicated(answered | failed),
                "failed_recorded": ledger.recorded(failed)}

    table = []
    for row in rows:
        lo, hi = row["window_s"]
        signals = row["signals_s"]
        recovered = None if any(v is None for v in signals.values()) else max(signals.values(), default=0.0)
        table.append({"fault": row["fault"], "what": row["what"], **counts([o for o in seen if lo <= o.sent_s < hi]),
                      "recovery_s": recovered, "signals_s": signals, "held_s": row["held_s"], "notes": row["notes"]})
    total = counts(seen)
    return {"rows": table, "total": total,
            "learner": {"applied_in_committed_state": applied, "learnable_records": ledger.learnable,
                        "pending": pending, "exactly_once": applied == ledger.learnable and pending == 0,
                        "caught_up_s": final.get("learner")},
            "stream": {"records": sum(len(v) for v in ledger.records.values()), "malformed": ledger.malformed,
                       "probe_records": sum(1 for k in ledger.records if k.startswith("probe-"))}}


def print_table(console: Any, report: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title="tempo chaos: faults under steady mixed load (tempo serve, tiny model)", title_justify="left")
    columns = ("fault", "sent", "answered", "4xx", "5xx", "aborted", "refused", "expected", "recorded", "lost",
               "duplicated", "recovery s")
    for c in columns:
        table.add_column(c, justify="left" if c == "fault" else "right")
    for row in [*report["rows"], {"fault": "total", **report["total"], "recovery_s": None}]:
        rec = row.get("recovery_s")
        table.add_row(*(str(row[c]) for c in columns[:-1]),
                      "-" if row["fault"] == "total" else ("never" if rec is None else f"{rec:.1f}"))
    console.print(table)
    learner = report["learner"]
    console.print(f"online learner: {learner['applied_in_committed_state']} records applied in its committed state, "
                  f"{learner['learnable_records']} learnable records in the stream, {learner['pending']} pending: "
                  f"{'exactly once' if learner['exactly_once'] else 'NOT exactly once'}")
    for row in report["rows"]:
        notes = {k: v for k, v in row["notes"].items() if v is not None}
        if notes:
            console.print(f"[dim]{row['fault']}:[/] {json.dumps(notes)}")


def verdict(report: dict[str, Any]) -> list[str]:
    """What the matrix must show, as problems (empty: it passed)."""
    problems = []
    for row in report["rows"]:
        name = row["fault"]
        if row["lost"] or row["duplicated"]:
            problems.append(f"{name}: {row['lost']} completions lost, {row['duplicated']} duplicated")
        if row["5xx"] and name != "serve-restart":
            problems.append(f"{name}: {row['5xx']} clients saw a 5xx")
        if "not_injected" in row["notes"]:
            problems.append(f"{name}: not injected ({row['notes']['not_injected']})")
        if row["recovery_s"] is None:
            problems.append(f"{name}: never recovered ({row['signals_s']})")
        if row["notes"].get("refused") is False:
            problems.append(f"{name}: the bad model was not refused ({row['notes']})")
    if not report["learner"]["exactly_once"]:
        problems.append(f"online learner: not exactly once ({report['learner']})")
    return problems
