"""``tempo estimator ...`` commands: loadtest against a running service, retrain, publish, user errors."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
import redis
from tempo.estimator.app import create_app
from tempo.estimator.castillo_stream import DEFAULT_MODEL, completion_records, small_artifact
from tempo.estimator.settings import Settings
from tempo.estimator.store import Store

from tempo.cli import main
from tests.conftest import serve_asgi


def test_loadtest_reports_throughput_and_latency(redis_client: redis.Redis, redis_url: str, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    artifacts = tmp_path / "artifacts"
    assert main(["estimator", "publish", str(small_artifact()), "--redis-url", redis_url,
                 "--artifacts", str(artifacts)]) == 0
    app = create_app(Settings(redis_url=redis_url, artifacts_dir=artifacts))
    with serve_asgi(app) as url:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).json()["model_version"]:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.1)
        out = tmp_path / "single.json"
        assert main(["estimator", "loadtest", "--url", url, "--concurrency", "4",
                     "--duration", "1", "--json", str(out)]) == 0
        result = json.loads(out.read_text())
        assert result["requests"] > 10 and result["errors"] == 0 and 0 < result["p50_ms"] <= result["p99_ms"]
        assert main(["estimator", "loadtest", "--url", url, "--concurrency", "2",
                     "--duration", "1", "--batch", "32", "--rate", "20", "--distinct"]) == 0
        assert "batch distinct:" in capsys.readouterr().out


def test_retrain_skips_small_windows_and_writes_its_report(redis_client: redis.Redis, redis_url: str,
                                                           tmp_path: Path) -> None:
    store = Store(redis_url)
    for r in completion_records(DEFAULT_MODEL, n=30, with_prompt=False):
        store.append_completion(r)
    out = tmp_path / "report.json"
    assert main(["estimator", "retrain", "--min-samples", "100", "--redis-url", redis_url,
                 "--artifacts", str(tmp_path / "a"), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["status"] == "skipped"
    assert store.get_json("retrain:last")["status"] == "skipped"  # type: ignore[index]


@pytest.mark.parametrize("argv", [
    ["estimator", "retrain", "--since", "yesterday"],
    ["estimator", "retrain", "--redis-url", "redis://127.0.0.1:1/0"],
    ["estimator", "loadtest", "--url", "ftp://x"],
    ["estimator", "loadtest", "--url", "http://127.0.0.1:1", "--duration", "0.2"],
    ["estimator", "rollback", "--redis-url", "redis://127.0.0.1:1/0"],
])
def test_user_errors_print_one_line_and_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tempo: error:") and "\n" not in err


def test_publish_refuses_a_tampered_artifact(redis_client: redis.Redis, redis_url: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(small_artifact(), copy)
    (copy / "text_score.npy").write_bytes(b"tampered")
    assert main(["estimator", "publish", str(copy), "--redis-url", redis_url, "--artifacts", str(tmp_path / "a")]) == 2
    assert "checksum" in capsys.readouterr().err


def test_rollback_without_history_is_a_user_error(redis_client: redis.Redis, redis_url: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["estimator", "rollback", "--redis-url", redis_url]) == 2
    assert "no earlier version" in capsys.readouterr().err


def test_periodic_retrain_loops_until_stopped(redis_client: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    import threading

    from tempo.estimator.retrain import periodic

    stop = threading.Event()
    thread = threading.Thread(target=periodic, args=(Store(redis_url), Settings(redis_url=redis_url,
                              artifacts_dir=tmp_path / "a"), 0.05, 10_000, None, stop))
    thread.start()
    time.sleep(0.5)
    stop.set()
    thread.join(5)
    assert not thread.is_alive()
    assert Store(redis_url).get_json("retrain:last")["status"] == "skipped"  # type: ignore[index]
