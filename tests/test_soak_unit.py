"""``tempo soak``: ``--engine-nice`` sets every thread of the named descendants, others keep theirs; a server
that exits during the load is reported with its log's last lines."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

psutil = pytest.importorskip("psutil")

from tempo.serving.chaos.soak import renice_descendants, server_outcome  # noqa: E402

THREADED = "import threading, time; threading.Thread(target=time.sleep, args=(30,)).start(); time.sleep(30)"


def test_renice_sets_every_thread_of_matching_descendants_only() -> None:
    parent = subprocess.Popen(["bash", "-c", f"{sys.executable} -c '{THREADED}' & sleep 30 & wait"])
    try:
        root = psutil.Process(parent.pid)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            kids = root.children(recursive=True)
            if len(kids) == 2 and any(len(k.threads()) == 2 for k in kids):
                break
            time.sleep(0.05)
        threaded = next(k for k in kids if k.name() != "sleep")
        sleeper = next(k for k in kids if k.name() == "sleep")
        assert renice_descendants(parent.pid, 7, threaded.name()[:4]) == [threaded.name()]
        assert [os.getpriority(os.PRIO_PROCESS, t.id) for t in threaded.threads()] == [7, 7]
        assert os.getpriority(os.PRIO_PROCESS, sleeper.pid) == os.getpriority(os.PRIO_PROCESS, os.getpid())
        assert renice_descendants(parent.pid, 7, "VLLM::") == []
    finally:
        for p in psutil.Process(parent.pid).children(recursive=True):
            p.kill()
        parent.kill()
        parent.wait()


def test_a_server_that_exits_during_the_load_is_reported_with_its_log_tail(tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    error = "(EngineCore pid=7) ERROR 12-03 14:49:23 [core.py:1512] ValueError: cannot convert float NaN"
    log.write_text("".join(f"line {i}\n" for i in range(50)) + error + "\n"
                   + "".join(f"line {i}\n" for i in range(50, 100)) + "RuntimeError: the engine core died\n")
    got = server_outcome(1, 305.2, log, lines=3)
    assert got["exited_during_load"] and got["exit_s"] == 305.2 and got["returncode"] == 1
    assert got["log_tail"] == ["line 98", "line 99", "RuntimeError: the engine core died"]
    assert got["log_errors"] == [error]  # what stopped it, before the shutdown's noise
    assert server_outcome(-15, None, log) == {"exited_during_load": False}  # stopped by the soak at the end


SLO = {"ttft_s": 0.05, "tbt_s": 0.01, "deadline_s": 3.0, "stage_deadline_s": 0.7}


def test_alternating_blocks_carry_their_rate_and_their_own_ids() -> None:
    from tempo.serving.chaos.soak import alternating_workload

    workload, blocks = alternating_workload((2.0, 8.0), 30.0, 120.0, 0, SLO)
    ids = {w.id for w in workload}
    assert len(ids) == len(workload) == len(blocks)
    assert all(d in ids for w in workload for d in w.depends_on)  # a job's calls stay one job
    first = {}
    for w in workload:
        block, offset = blocks[w.id]
        assert w.id.startswith(f"b{block}.") and w.arrival_s == pytest.approx(30.0 * block + offset)
        if w.job_id is None or not w.depends_on:
            first.setdefault(block, 0)
            first[block] += 1
    assert sorted(first) == [0, 1, 2, 3]
    assert min(first[1], first[3]) > 2 * max(first[0], first[2])  # arrivals at 8/s against 2/s


def test_paired_loads_compare_neighbouring_blocks_and_leave_out_the_settling_seconds() -> None:
    from tempo.scheduler.goodput import RequestOutcome
    from tempo.serving.chaos.soak import paired_loads
    from tempo.serving.sim.testing import make_request

    outcomes, blocks = [], {}
    for block in range(4):
        for i in range(10):
            offset = 1.0 + i * 5.0  # two of ten in the settling seconds
            met = i < (8 if block % 2 == 0 else 6)  # the second load meets fewer
            w = make_request(f"b{block}.{i}", "deadline", arrival_s=block * 60 + offset, output_tokens=2)
            end = w.arrival_s + (1.0 if met else 30.0)  # the deadline: 20 s
            outcomes.append(RequestOutcome(request_id=w.id, slo=w.slo(), arrival_s=w.arrival_s, prompt_tokens=10,
                                           token_times_s=(end - 0.1, end), finished=True))
            blocks[w.id] = (block, offset)
    report = paired_loads(outcomes, blocks, (2.0, 4.0), 60.0, 10.0)
    assert report["pairs"] == 2 and report["per_load"]["2x"]["blocks"] == 2
    assert report["per_load"]["2x"]["attainment"]["deadline"] == pytest.approx(6 / 8)  # i = 2..7 of 2..9
    assert report["per_load"]["4x"]["attainment"]["deadline"] == pytest.approx(4 / 8)
    assert report["difference_median"]["deadline"] == pytest.approx(-0.25)
    assert report["difference_median"]["latency"] is None


def test_steal_share_is_the_hypervisors_part_of_the_cpu_time_between_two_readings() -> None:
    from tempo.serving.chaos.soak import cpu_times, steal_share

    before = [100, 0, 50, 800, 0, 0, 0, 50]
    after = [200, 0, 100, 1500, 0, 0, 0, 100]  # 900 ticks, 50 of them stolen
    assert steal_share(before, after) == round(50 / 900, 4)
    assert steal_share(after, after) is None and steal_share(None, after) is None
    now = cpu_times()
    assert now is None or (len(now) == 8 and all(v >= 0 for v in now))
