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
    log.write_text("".join(f"line {i}\n" for i in range(100)) + "RuntimeError: the engine core died\n")
    got = server_outcome(1, 305.2, log, lines=3)
    assert got["exited_during_load"] and got["exit_s"] == 305.2 and got["returncode"] == 1
    assert got["log_tail"] == ["line 98", "line 99", "RuntimeError: the engine core died"]
    assert server_outcome(-15, None, log) == {"exited_during_load": False}  # stopped by the soak at the end
