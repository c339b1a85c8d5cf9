"""``tempo soak``: the stack under steady mixed load for a long time (or far past saturation), sampled.

It starts the stack (a Redis of its own, the estimator service, ``tempo serve`` with a bounded queue:
``--max-in-flight``), calibrates SLOs and the saturation rate to this engine (cached per machine), then
replays a mixed workload at ``load`` x saturation for ``duration`` seconds. A sampler records, every
``interval``: the resident memory of tempo serve's processes and of the estimator, Redis' used memory,
and requests in flight. Afterwards, per interval of arrivals (refused ones included): attainment per
class, TTFT p99 (chat), end-to-end p99 (deadline); refusals (503, with their reason) and policy
rejections with the time the client waited for them, as the load generator saw it and as an idle probe
in its own process saw it (``probe``). Memory is summed up by its first and last
samples and its slope over the second half (per hour).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import subprocess
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tempo.serving.chaos.probe import summary as probe_summary

from tempo.errors import TempoError

PROBE_INTERVAL_S = 0.2
CALIBRATION = Path(".cache/stack/soak-calibration.json")


@dataclass
class SoakConfig:
    duration_s: float = 3600.0
    load: float = 1.0  # x the calibrated saturation rate
    rps: float | None = None  # overrides load
    interval_s: float = 30.0
    model: str = "tiny"
    policy: str = "tempo"
    max_in_flight: int = 64
    # the engine's KV cache becomes resident page by page as blocks are first used, so tempo serve's RSS
    # climbs until all of it is touched: a smaller cache reaches that bound sooner
    kv_cache_gib: int = 4
    stream_maxlen: int | None = None  # Redis retention (None: the defaults of tempo serve and the service)
    dedupe_ttl_s: int | None = None
    seed: int = 0
    out: Path = Path("out/soak")
    # niceness of vLLM's engine processes (0: as started). On a machine whose cores the load generator shares,
    # a positive value keeps the client and the API server ahead of the engine, as separate client machines
    # and a front end on cores of its own would
    engine_nice: int = 0
    freeze_gc: bool = True  # tempo serve's --freeze-gc (off: the API server's collections traverse its whole heap)
    # paired loads: blocks of block_s alternate between load and alternate_load in one run, so that a slower
    # or faster host (this machine's engine speed drifts by 2x between runs) weighs on both alike
    alternate_load: float | None = None
    block_s: float = 60.0
    settle_s: float = 10.0  # the first seconds of each block are left out (the previous block's queue drains)

    def validate(self) -> None:
        if self.duration_s <= 0 or self.interval_s <= 0 or self.load <= 0 or (self.rps is not None and self.rps <= 0):
            raise TempoError("--duration, --interval, --load and --rps must be > 0")
        if self.max_in_flight < 1:
            raise TempoError("--max-in-flight must be >= 1")
        if not 0 <= self.engine_nice <= 19:
            raise TempoError("--engine-nice must be in 0..19")
        if self.alternate_load is not None and (self.alternate_load <= 0 or self.rps is not None):
            raise TempoError("--alternate-load must be > 0, and goes with --load, not --rps")
        if not 0 <= self.settle_s < self.block_s:
            raise TempoError("--settle must be >= 0 and below --block")


def renice_descendants(pid: int, nice: int, name_prefix: str = "VLLM::") -> list[str]:
    """Set the niceness of every thread of ``pid``'s descendants whose name starts with ``name_prefix``
    (vLLM's engine core and worker); the names of the processes changed. Linux keeps a niceness per thread,
    and torch's threads exist already, so each thread is set, not only the process."""
    import os

    import psutil

    changed = []
    for child in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            if child.name().startswith(name_prefix):
                for thread in child.threads():
                    with contextlib.suppress(ProcessLookupError):
                        os.setpriority(os.PRIO_PROCESS, thread.id, nice)
                changed.append(child.name())
    return changed


def _rss_mb(pid: int) -> dict[str, float]:
    """Resident memory (MiB) of a process and each of its descendants by name (tempo serve's API server and
    engine core), and their ``total``."""
    import psutil

    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {"total": 0.0}
    out: dict[str, float] = {}
    for p in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            name = p.name()
            out[name] = round(out.get(name, 0.0) + p.memory_info().rss / 2**20, 1)
    out["total"] = round(sum(out.values()), 1)
    return out


class Sampler(threading.Thread):
    def __init__(self, interval_s: float, serve_pid: int, estimator_pid: int, redis_url: str, live: Any) -> None:
        super().__init__(name="tempo-soak-sampler", daemon=True)
        import redis

        self.interval_s, self.serve_pid, self.estimator_pid, self.live = interval_s, serve_pid, estimator_pid, live
        self.redis = redis.Redis.from_url(redis_url, socket_timeout=5)
        self.samples: list[dict[str, float]] = []
        self.done = threading.Event()
        self._cpu = cpu_times()

    def sample(self) -> None:
        t0 = self.live.t0 or time.monotonic()
        observed = list(self.live.observed.values())
        try:
            redis_mb = int(self.redis.info("memory")["used_memory"]) / 2**20
        except Exception:  # a sample must not end the soak
            redis_mb = float("nan")
        serve = _rss_mb(self.serve_pid)
        cpu, self._cpu = self._cpu, cpu_times()
        self.samples.append({"steal_share": steal_share(cpu, self._cpu),
            "t_s": round(time.monotonic() - t0, 1), "serve_rss_mb": serve.pop("total"), "serve_rss_by_process": serve,
            "estimator_rss_mb": _rss_mb(self.estimator_pid)["total"], "redis_mb": round(redis_mb, 2),
            "sent": len(observed), "in_flight": sum(1 for o in observed if o.ended_s is None)})

    def run(self) -> None:
        while not self.done.wait(self.interval_s):
            self.sample()


def cpu_times() -> list[int] | None:
    """The machine's CPU time counters (``/proc/stat``'s ``cpu`` line: user ... steal); None off Linux."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            return [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None


def steal_share(before: list[int] | None, after: list[int] | None) -> float | None:
    """Of the CPU time between two ``cpu_times``, the share the hypervisor gave to others (steal): time this
    virtual machine's processes were ready and no core ran them, which no niceness here can change."""
    if before is None or after is None or sum(after) <= sum(before):
        return None
    return round((after[7] - before[7]) / (sum(after) - sum(before)), 4)


def _slope_per_hour(samples: list[dict[str, float]], key: str) -> float | None:
    """Least-squares slope of ``key`` over the second half of the run, in units per hour."""
    half = [s for s in samples[len(samples) // 2:] if s.get(key) is not None]
    if len(half) < 3:
        return None
    t = np.array([s["t_s"] for s in half]) / 3600
    y = np.array([s[key] for s in half])
    return round(float(np.polyfit(t, y, 1)[0]), 2)


def memory_summary(samples: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """First, last, max and second-half slope (per hour) of each memory series, tempo serve's processes
    (API server, engine core, model worker) each on its own (``serve:<name>``)."""
    rows = [{**s, **{f"serve:{n}": v for n, v in s.get("serve_rss_by_process", {}).items()}} for s in samples]
    keys = ["serve_rss_mb", *sorted({k for r in rows for k in r if k.startswith("serve:")}), "estimator_rss_mb",
            "redis_mb"]
    return {k: {"first": rows[0].get(k) if rows else None, "last": rows[-1].get(k) if rows else None,
                "max": max((r[k] for r in rows if r.get(k) is not None), default=None),
                "slope_per_hour": _slope_per_hour(rows, k)} for k in keys}


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.quantile(values, q)), 4) if values else None


def per_interval(outcomes: list[Any], interval_s: float) -> list[dict[str, Any]]:
    """Attainment per class and latency p99s of the requests that arrived in each interval."""
    from tempo.scheduler.goodput import account

    if not outcomes:
        return []
    start = min(o.arrival_s for o in outcomes)
    buckets: dict[int, list[Any]] = {}
    for o in outcomes:
        buckets.setdefault(int((o.arrival_s - start) // interval_s), []).append(o)
    rows = []
    for i in sorted(buckets):
        report = account(buckets[i], duration_s=interval_s).to_dict()
        pc = report["per_class"]
        rows.append({"t_s": round((i + 0.5) * interval_s, 1), "requests": len(buckets[i]),
                     "attainment": {c: r["attainment"] for c, r in pc.items()},
                     "latency_ttft_p99_s": pc.get("latency", {}).get("ttft_s", {}).get("p99"),
                     "deadline_e2e_p99_s": pc.get("deadline", {}).get("e2e_s", {}).get("p99"),
                     "token_goodput": report["token_goodput"]})
    return rows


def run_soak(config: SoakConfig, console: Any) -> dict[str, Any]:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from tempo.scheduler.goodput import account
    from tempo.serving.bench.engine_client import LiveReplay, ReplayConfig, replay, scrape_metrics
    from tempo.serving.chaos.run import chaos_workload
    from tempo.serving.vllm.config import ServeConfig
    from tempo.serving.vllm.launch import ManagedServer
    from tempo.serving.vllm.server import resolve_model
    from tempo.serving.vllm.stack import EstimatorService, LocalRedis, Stack, bootstrap_artifact

    from tempo.demo import cached_calibration

    config.validate()
    served = resolve_model(config.model)[1]
    logs = config.out / "logs"
    with Stack() as stack, Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                                    console=console, transient=True) as progress:
        task = progress.add_task("starting the stack", total=None)
        redis = stack.add(LocalRedis())
        # the same retention for both writers of the stream: tempo serve's options, the service's settings
        retention = [(option, env, value) for option, env, value in (
            ("--stream-maxlen", "TEMPO_STREAM_MAXLEN", config.stream_maxlen),
            ("--dedupe-ttl", "TEMPO_DEDUPE_TTL_S", config.dedupe_ttl_s)) if value is not None]
        estimator = stack.add(EstimatorService(redis.url, bootstrap_artifact(), logs / "estimator.log",
                                               env={env: str(value) for _, env, value in retention}))
        server = stack.add(ManagedServer(["--model", config.model, "--policy", config.policy, "--redis-url",
                                          redis.url, "--estimator-url", estimator.url, "--max-in-flight",
                                          str(config.max_in_flight), "--kv-cache-gib", str(config.kv_cache_gib),
                                          *[a for option, _, value in retention for a in (option, str(value))],
                                          *([] if config.freeze_gc else ["--no-freeze-gc"])],
                                         logs / "serve.log"))
        server.start()
        if config.engine_nice and not renice_descendants(server.process.pid, config.engine_nice):
            raise TempoError("--engine-nice: no VLLM:: engine process found under tempo serve")
        progress.update(task, description="calibrating SLOs and saturation to this engine (cached per machine)")
        # the burst is new work: it must fit below the slots tempo serve keeps for admitted jobs
        open_slots = config.max_in_flight - ServeConfig(max_in_flight=config.max_in_flight).job_reserve_slots
        calibration = cached_calibration(server.url, chaos_workload(2.0, 120.0, config.seed + 1), served,
                                         CALIBRATION.with_name(f"soak-calibration-{served}.json"),
                                         burst=min(16, open_slots))
        slo = calibration["slo"]
        saturation = float(calibration["saturation"]["rps"])
        rps = config.rps or round(config.load * saturation, 3)
        slo_fields = {"ttft_s": slo["ttft_s"], "tbt_s": slo["tbt_s"], "deadline_s": slo["deadline_s"],
                      "stage_deadline_s": slo["stage_deadline_s"]}
        if config.alternate_load is None:
            workload = chaos_workload(rps, config.duration_s, config.seed, **slo_fields)
            blocks: dict[str, tuple[int, float]] = {}
        else:
            rates = (rps, round(config.alternate_load * saturation, 3))
            workload, blocks = alternating_workload(rates, config.block_s, config.duration_s, config.seed,
                                                    slo_fields)
        live = LiveReplay()
        sampler = Sampler(config.interval_s, server.process.pid, estimator.process.pid, redis.url, live)
        probe_log = config.out / "probe.jsonl"
        probe_log.unlink(missing_ok=True)
        prober = subprocess.Popen([sys.executable, "-m", "tempo.serving.chaos.probe", server.url, served,
                                   str(probe_log), str(PROBE_INTERVAL_S)], start_new_session=True)
        progress.update(task, description=f"{len(workload)} arrivals at {rps}/s ({rps / saturation:.2f}x saturation)",
                        total=config.duration_s, completed=0)
        result: dict[str, Any] = {}
        # the load generator's start-up heap (the workload, its modules) frozen, as tempo serve's: its own full
        # collections would stand still in the middle of the refusals it times
        gc.collect()
        gc.freeze()
        loader = threading.Thread(target=lambda: result.update(
            replay=asyncio.run(replay(workload, ReplayConfig(server.url, served, forced_with_text=True,
                                                              max_tokens_cap=256, request_timeout_s=600.0,
                                                              live=live)))), daemon=True)
        loader.start()
        while live.t0 is None:
            time.sleep(0.05)
        sampler.start()
        server_exit_s: float | None = None
        while loader.is_alive():
            if time.monotonic() - live.t0 > config.duration_s:
                live.stop.set()  # arrivals are over; late compound stages are not sent
            if server_exit_s is None and server.process.poll() is not None:
                server_exit_s = round(time.monotonic() - live.t0, 1)  # a finding: the run stops, the report says
                live.stop.set()
            progress.update(task, completed=min(config.duration_s, time.monotonic() - live.t0))
            loader.join(1.0)
        sampler.done.set()
        sampler.sample()
        scrape = asyncio.run(scrape_metrics(server.url)) if server.process.poll() is None else None
        prober.terminate()
        prober.wait(40)
    replayed = result["replay"]
    observed = list(replayed.observed.values())
    refused = [o for o in observed if o.status == 503]
    rejected = [o for o in observed if o.status == 200 and o.finish_reason == "abort"]
    admitted = admitted_work(replayed.outcomes, set(replayed.observed), {r.request_id for r in refused})
    overall = account(admitted).to_dict()
    samples = sampler.samples
    refusal_waits = [o.ended_s - o.sent_s for o in refused]
    slow = [o for o in refused if o.ended_s - o.sent_s > 0.1]
    steals = [x["steal_share"] for x in samples if x.get("steal_share") is not None]
    return {
        "server": server_outcome(server.process.returncode, server_exit_s, server.log),
        "config": {"duration_s": config.duration_s, "load": round(rps / saturation, 3), "rps": rps,
                   "interval_s": config.interval_s, "model": config.model, "policy": config.policy,
                   "max_in_flight": config.max_in_flight, "kv_cache_gib": config.kv_cache_gib,
                   "stream_maxlen": config.stream_maxlen,
                   "dedupe_ttl_s": config.dedupe_ttl_s, "seed": config.seed, "engine_nice": config.engine_nice,
                   "freeze_gc": config.freeze_gc, "alternate_load": config.alternate_load,
                   "block_s": config.block_s, "settle_s": config.settle_s},
        "calibration": {"slo": slo, "saturation_rps": saturation},
        "requests": {"sent": len(observed),
                     "answered": sum(1 for o in observed if o.finish_reason in ("stop", "length")),
                     "refused": len(refused), "rejected": len(rejected), "never_sent": replayed.never_sent,
                     "errors": replayed.errors},
        "refusals": {"reasons": {r: sum(1 for o in refused if o.reason == r) for r in {o.reason for o in refused}},
                     "wait_ms_p50": _ms(_pct(refusal_waits, 0.5)), "wait_ms_p99": _ms(_pct(refusal_waits, 0.99)),
                     "wait_ms_max": _ms(max(refusal_waits, default=None)),
                     "over_100ms": len(slow),
                     "over_100ms_across_own_stall": sum(1 for o in slow if any(
                         a < o.ended_s and o.sent_s < b for a, b, _ in replayed.loop_stalls_s)),
                     # the same, seen by an idle client in its own process (the load generator's loop is busy)
                     "probe": probe_summary(probe_log)},
        # the load generator's own lag (its loop also streams every admitted answer): a compound job's later
        # stages are released late by it, which the job's deadline pays
        "load_generator": {"late_ms_p50": _ms(_pct([o.late_s for o in observed if o.late_s is not None], 0.5)),
                           "late_ms_p99": _ms(_pct([o.late_s for o in observed if o.late_s is not None], 0.99)),
                           "loop_stalls": len(replayed.loop_stalls_s),  # wake-ups over STALL_S late
                           "loop_stall_ms_max": _ms(max((b - a for a, b, _ in replayed.loop_stalls_s), default=None)),
                           # its stalls: [start s, end s, seconds of it runnable without a core]
                           "loop_stalls_s": replayed.loop_stalls_s},
        "rejections": {"wait_ms_p50": _ms(_pct([o.ended_s - o.sent_s for o in rejected], 0.5)),
                       "wait_ms_p99": _ms(_pct([o.ended_s - o.sent_s for o in rejected], 0.99))},
        "admitted": {"attainment": {c: r["attainment"] for c, r in overall["per_class"].items()},
                     "token_goodput": overall["token_goodput"], "request_goodput": overall["request_goodput"]},
        "memory": memory_summary(samples),
        "steal_share": {"mean": _mean(steals), "max": max(steals, default=None)},
        # the API server's collections, and how late its event loop ran whatever the cause (None: it had exited)
        "gc_pauses": None if scrape is None else pauses(scrape, "tempo_gc_pause_seconds", "generation"),
        "loop_lag": None if scrape is None else {**pauses(scrape, "tempo_event_loop_lag_seconds").get("all", {}),
                                                 "max_ms": _ms(scrape.get("tempo_event_loop_lag_max_seconds"))},
        "alternating": None if config.alternate_load is None else paired_loads(
            admitted, blocks, (config.load, config.alternate_load), config.block_s, config.settle_s),
        "samples": samples,
        "intervals": per_interval(replayed.outcomes, config.interval_s),
    }


def pauses(metrics: dict[str, float], name: str, label: str | None = None) -> dict[str, dict[str, float]]:
    """A histogram of seconds the API server stood still, from a ``/metrics`` scrape (``scrape_metrics``): per
    value of ``label`` (``"all"`` without one), how many, seconds in all, and how many over 25 ms, 0.1 s (the
    refusal target) and 0.5 s."""
    series: dict[str, dict[str, float]] = defaultdict(dict)  # label value -> {count | sum | le: value}
    for key, value in metrics.items():
        metric, _, labels = key.partition("{")
        if metric not in (f"{name}_bucket", f"{name}_count", f"{name}_sum") or (not labels and (
                label or metric.endswith("_bucket"))):  # a series' total over its labels (parse_metrics)
            continue
        fields = dict(part.split("=", 1) for part in labels.rstrip("}").split(",")) if labels else {}
        group = fields[label].strip('"') if label else "all"
        series[group][fields["le"].strip('"') if "le" in fields else metric.rsplit("_", 1)[1]] = value
    return {group: {"count": v["count"], "seconds": round(v["sum"], 3), "over_25ms": v["count"] - v["0.025"],
                    "over_100ms": v["count"] - v["0.1"], "over_500ms": v["count"] - v["0.5"]}
            for group, v in sorted(series.items())}


def server_outcome(returncode: int | None, exit_s: float | None, log: Path, lines: int = 40) -> dict[str, Any]:
    """Whether ``tempo serve`` lived through the load; if not, when it exited, its log's first error lines
    (vLLM's traceback of what stopped it; its shutdown noise comes after) and last lines."""
    if exit_s is None:
        return {"exited_during_load": False}
    text = log.read_text(errors="replace").splitlines() if log.is_file() else []
    errors = [line for line in text if " ERROR " in line or line.startswith("Traceback")][:lines]
    return {"exited_during_load": True, "exit_s": exit_s, "returncode": returncode, "log": str(log),
            "log_errors": errors, "log_tail": text[-lines:]}


def alternating_workload(rates: tuple[float, float], block_s: float, duration_s: float, seed: int,
                         slo: dict[str, float]) -> tuple[list[Any], dict[str, tuple[int, float]]]:
    """Blocks of ``block_s`` whose arrival rate alternates between ``rates``; each block its own seeded
    workload, its ids prefixed ``b<k>.``. Also ``{request id: (block, seconds into the block of the request's
    arrival, a compound call's job's)}``."""
    from tempo.serving.chaos.run import chaos_workload

    workload: list[Any] = []
    blocks: dict[str, tuple[int, float]] = {}
    for k in range(max(1, round(duration_s / block_s))):
        def renamed(name: str, k: int = k) -> str:
            return f"b{k}.{name}"

        for w in chaos_workload(rates[k % 2], block_s, seed + k, **slo):
            moved = w.model_copy(update={
                "id": renamed(w.id), "arrival_s": w.arrival_s + k * block_s,
                "job_id": None if w.job_id is None else renamed(w.job_id),
                "depends_on": [renamed(d) for d in w.depends_on]})
            workload.append(moved)
            blocks[moved.id] = (k, w.arrival_s)
    return workload, blocks


def paired_loads(admitted: list[Any], blocks: dict[str, tuple[int, float]], loads: tuple[float, float],
                 block_s: float, settle_s: float) -> dict[str, Any]:
    """Admitted work per load of an alternating run (requests that arrived in a block's first ``settle_s``
    left out), and per pair of neighbouring blocks the second load's attainment less the first's."""
    from tempo.scheduler.goodput import account

    by_block: dict[int, list[Any]] = defaultdict(list)
    for o in admitted:
        block, offset = blocks[o.request_id]
        if offset >= settle_s:
            by_block[block].append(o)
    counted_s = block_s - settle_s
    per_load: dict[str, Any] = {}
    attainment: dict[int, dict[str, float]] = {}
    for block, outcomes in by_block.items():
        attainment[block] = {c: r["attainment"] for c, r in account(outcomes).to_dict()["per_class"].items()}
    for side, load in enumerate(loads):
        mine = sorted(b for b in by_block if b % 2 == side)
        report = account([o for b in mine for o in by_block[b]], duration_s=counted_s * len(mine)).to_dict()
        per_load[f"{load:g}x"] = {"blocks": len(mine),
                                  "attainment": {c: r["attainment"] for c, r in report["per_class"].items()},
                                  "token_goodput": report["token_goodput"],
                                  "request_goodput": report["request_goodput"]}
    pairs = [(b, b + 1) for b in sorted(attainment) if b % 2 == 0 and b + 1 in attainment]
    differences = {c: [attainment[b][c] - attainment[a][c] for a, b in pairs
                       if c in attainment[a] and c in attainment[b]]
                   for c in ("latency", "deadline", "compound")}
    return {"block_s": block_s, "settle_s": settle_s, "per_load": per_load, "pairs": len(pairs),
            "difference_median": {c: round(float(np.median(d)), 4) if d else None for c, d in differences.items()},
            "difference_range": {c: [round(min(d), 4), round(max(d), 4)] if d else None
                                 for c, d in differences.items()}}


def admitted_work(outcomes: list[Any], sent: set[str], refused: set[str]) -> list[Any]:
    """The outcomes of admitted work: requests sent and not refused, and every call of a job with at least
    one call admitted (a call refused later, or never sent because of one, makes that job a miss). A job
    refused at its first stage was never admitted, though its later calls, never sent, are outcomes too."""
    got_in = sent - refused
    admitted_jobs = {o.job_id for o in outcomes if o.job_id is not None and o.request_id in got_in}
    return [o for o in outcomes if (o.job_id in admitted_jobs if o.job_id is not None else o.request_id in got_in)]


def _mean(values: list[float]) -> float | None:
    return round(float(np.mean(values)), 4) if values else None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000 * seconds, 1)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples, intervals = report["samples"], report["intervals"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    t = [s["t_s"] / 60 for s in samples]
    axes[0][0].plot(t, [s["serve_rss_mb"] for s in samples], label="tempo serve (all processes)")
    names = sorted({n for s in samples for n in s.get("serve_rss_by_process", {})})
    for name in names:
        axes[0][0].plot(t, [s.get("serve_rss_by_process", {}).get(name) for s in samples], ":",
                        label=f"  {name}")
    axes[0][0].plot(t, [s["estimator_rss_mb"] for s in samples], label="estimator service")
    axes[0][0].set_ylabel("resident memory (MiB)")
    axes[0][0].legend()
    axes[0][1].plot(t, [s["redis_mb"] for s in samples], color="#d62728")
    axes[0][1].set_ylabel("Redis used memory (MiB)")
    ti = [r["t_s"] / 60 for r in intervals]
    axes[1][0].plot(ti, [r["latency_ttft_p99_s"] for r in intervals], label="chat TTFT p99")
    axes[1][0].plot(ti, [r["deadline_e2e_p99_s"] for r in intervals], label="deadline E2E p99")
    axes[1][0].set_ylabel("seconds")
    axes[1][0].set_yscale("log")
    axes[1][0].legend()
    for cls in ("latency", "deadline", "compound"):
        axes[1][1].plot(ti, [r["attainment"].get(cls) for r in intervals], label=cls)
    axes[1][1].set_ylabel("SLO attainment (all sent, by arrival)")
    axes[1][1].set_ylim(0, 1.05)
    axes[1][1].legend()
    for ax in axes[1]:
        ax.set_xlabel("minutes")
    c = report["config"]
    if c.get("alternate_load") is None:
        load = f"at {c['load']:g}x saturation ({c['rps']} arrivals/s)"
    else:  # the other load's blocks shaded
        load = f"alternating {c['load']:g}x / {c['alternate_load']:g}x saturation (shaded) every {c['block_s']:g} s"
        for ax in (*axes[0], *axes[1]):
            for start in np.arange(c["block_s"], c["duration_s"], 2 * c["block_s"]):
                ax.axvspan(start / 60, (start + c["block_s"]) / 60, color="0.9", zorder=0)
    fig.suptitle(f"tempo soak: {c['duration_s'] / 60:.0f} min {load}, {c['policy']} on {c['model']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
