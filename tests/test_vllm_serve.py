"""``tempo serve`` end to end on the real vLLM-CPU engine (tiny model), with a real Redis and an estimator
over HTTP: SLO fields reach the engine, bad ones get 400, rejections reach the client, the estimator and
Redis may fail without stopping serving, and every completion lands in the stream exactly once.
Needs ``make vllm``."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from tempo.serving.vllm.launch import ManagedServer

from tests.conftest import RedisServer, free_port
from tests.estimator_stub import StubEstimator

pytestmark = pytest.mark.vllm
STARTUP_S = 240


class Served:
    def __init__(self, url: str, redis_server: RedisServer, estimator: StubEstimator, log: Path) -> None:
        self.url, self.redis, self.estimator, self.log = url, redis_server, estimator, log

    def records(self) -> dict[str, list[dict[str, Any]]]:
        """Stream records by the client's request id (``X-Request-Id``), which vLLM puts inside its own."""
        client = redis.Redis.from_url(self.redis.url)
        out: dict[str, list[dict[str, Any]]] = {}
        for _, fields in client.xrange("tempo:completions"):
            record = json.loads(fields[b"data"])
            tag = record["request_id"].split("-t-")[-1].rsplit("-", 1)[0] if "-t-" in record["request_id"] else ""
            out.setdefault(tag, []).append(record)
        return out


def start_server(args: list[str], log: Path, port: int) -> ManagedServer:
    return ManagedServer(args, log, port, startup_s=STARTUP_S, env={"VLLM_CPU_KVCACHE_SPACE": "1"}).start()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    pytest.importorskip("vllm")
    work = tmp_path_factory.mktemp("serve")
    redis_server = RedisServer(work)
    redis_server.start()
    estimator = StubEstimator()
    port = free_port()
    process = start_server(["--model", "tiny", "--policy", "tempo", "--redis-url", redis_server.url,
                            "--estimator-url", estimator.url, "--estimator-timeout", "0.2",
                            "--default-slo-class", "best_effort", "--", "--max-model-len", "2048"],
                           work / "serve.log", port)
    try:
        yield Served(f"http://127.0.0.1:{port}", redis_server, estimator, work / "serve.log")
    finally:
        process.stop()
        estimator.close()
        redis_server.stop()


def chat(served: Served, tag: str, xargs: dict[str, Any] | None = None, stream: bool = False,
         max_tokens: int = 8, headers: dict[str, str] | None = None) -> httpx.Response:
    body: dict[str, Any] = {"model": "tiny-llama", "messages": [{"role": "user", "content": f"Say hi ({tag})"}],
                            "max_tokens": max_tokens, "stream": stream}
    if xargs is not None:
        body["vllm_xargs"] = xargs
    return httpx.post(f"{served.url}/v1/chat/completions", json=body, timeout=60,
                      headers={"X-Request-Id": f"t-{tag}", **(headers or {})})


def wait_for_records(served: Served, tags: list[str], timeout_s: float = 30) -> dict[str, list[dict[str, Any]]]:
    deadline = time.monotonic() + timeout_s
    while True:
        records = served.records()
        if all(t in records for t in tags) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def test_slo_fields_reach_the_engine_and_bad_ones_get_400(served: Served) -> None:
    plain = chat(served, "plain")
    assert plain.status_code == 200 and plain.json()["choices"][0]["message"]["content"]
    deadline = chat(served, "dl", {"slo_class": "deadline", "deadline_s": 30, "app": "code/Mbpp"})
    latency = chat(served, "lat", headers={"x-slo-ttft-ms": "5000", "x-slo-tpot-ms": "500"})
    job = chat(served, "job", {"slo_class": "compound", "job_id": "J1", "stage": 0, "job_deadline_s": 60,
                               "app": "deep_research"})
    assert [r.status_code for r in (deadline, latency, job)] == [200, 200, 200]
    records = wait_for_records(served, ["plain", "dl", "lat", "job"])
    assert records["plain"][0]["slo_class"] == "best_effort"  # the configured default class
    dl = records["dl"][0]
    assert (dl["slo_class"], dl["app"], dl["slo_met"], dl["bound"]) == ("deadline", "code/Mbpp", True, 8)
    assert dl["bound_fallback"] is False and dl["finish_reason"] == "length" and "sketch" in dl
    assert "prompt" not in dl  # text is not stored unless configured
    assert records["lat"][0]["slo_class"] == "latency" and records["lat"][0]["first_token_s"] is not None
    assert (records["job"][0]["job_id"], records["job"][0]["stage"]) == ("J1", 0)
    for xargs in ({"slo_class": "deadline", "ttft_slo_s": 1}, {"deadline_s": -1}, {"tempo_ladder": [0, 9]},
                  {"slo_class": "nope"}):
        bad = chat(served, "bad", xargs)
        assert bad.status_code == 400 and "\n" not in bad.json()["error"]["message"]
    assert chat(served, "bad", headers={"x-slo-tpot-ms": "soon"}).status_code == 400


def test_a_rejected_request_hears_why(served: Served) -> None:
    done = chat(served, "rej", {"slo_class": "deadline", "deadline_s": 0.001}, max_tokens=50)
    choice = done.json()["choices"][0]
    assert done.status_code == 200 and choice["finish_reason"] == "abort"
    assert choice["stop_reason"].startswith("tempo: rejected")
    with httpx.stream("POST", f"{served.url}/v1/chat/completions", timeout=60, json={
            "model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50,
            "stream": True, "vllm_xargs": {"slo_class": "deadline", "deadline_s": 0.001}}) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    last = chunks[-1]["choices"][0]
    assert last["finish_reason"] == "abort" and last["stop_reason"].startswith("tempo: rejected")
    record = wait_for_records(served, ["rej"])["rej"][0]
    assert record["finish_reason"] == "rejected" and record["slo_met"] is False


def test_serving_continues_when_the_estimator_is_slow_or_broken(served: Served) -> None:
    for mode in ("slow", "garbage", "absurd"):
        served.estimator.mode = mode
        started = time.perf_counter()
        response = chat(served, f"est-{mode}", {"deadline_s": 60})
        assert response.status_code == 200 and time.perf_counter() - started < 5
    served.estimator.mode = "ok"
    records = wait_for_records(served, ["est-slow", "est-garbage", "est-absurd"])
    assert all(records[f"est-{m}"][0]["bound_fallback"] is True for m in ("slow", "garbage", "absurd"))


def test_redis_outage_loses_and_duplicates_no_completion(served: Served) -> None:
    before = [f"pre{i}" for i in range(3)]
    during = [f"out{i}" for i in range(6)]
    for tag in before:
        assert chat(served, tag).status_code == 200
    wait_for_records(served, before)
    served.redis.stop()
    try:
        for tag in during:
            assert chat(served, tag).status_code == 200  # serving goes on without Redis
    finally:
        served.redis.start()  # an empty Redis (no persistence): only the queued records arrive now
    records = wait_for_records(served, during)
    assert {t: len(records.get(t, [])) for t in during} == dict.fromkeys(during, 1)


def test_compound_calls_are_scheduled_with_the_services_job_outlook(served: Served) -> None:
    job = {"slo_class": "compound", "job_id": "J-outlook", "job_deadline_s": 60, "app": "deep_research"}
    asked = len(served.estimator.job_queries)
    assert chat(served, "jo0", {**job, "stage": 0}).status_code == 200
    assert chat(served, "jo1", {**job, "stage": 1}).status_code == 200
    queries = [q for q in served.estimator.job_queries[asked:] if q["app"] == "deep_research"]
    assert [q["stage"] for q in queries] == [0, 1]
    # the engine sends what it saw of the job: stage 0's call (its prompt, its 8 tokens) before stage 1
    (stage0,) = queries[1]["history"]
    assert len(stage0) == 1 and stage0[0][0] == queries[0]["stage_prompts"][0] and stage0[0][1] == 8
    text = httpx.get(f"{served.url}/metrics", timeout=10).text
    service = [line for line in text.splitlines() if line.startswith('tempo_job_outlooks_total{source="service"}')]
    assert service and float(service[0].split()[-1]) >= 2


def test_tempo_metrics_are_served_beside_vllms(served: Served) -> None:
    chat(served, "m", {"deadline_s": 60})
    time.sleep(1)
    text = httpx.get(f"{served.url}/metrics", timeout=10).text
    for name in ("tempo_requests_finished_total", "tempo_good_tokens_total", "tempo_bound_covered_total",
                 "tempo_slo_attainment", "tempo_policy_decisions_total", "tempo_estimator_calls_total",
                 "tempo_bad_requests_total", "vllm:num_requests_running"):
        assert name in text, name
    decisions = [line for line in text.splitlines() if line.startswith("tempo_policy_decisions_total")]
    assert float(decisions[0].split()[-1]) > 0


@pytest.mark.parametrize("policy", ["tempo", "fcfs"])
def test_the_default_model_answers_with_real_text(policy: str, tmp_path: Path) -> None:
    """``tempo serve`` without ``--model``: SmolLM2-135M-Instruct (built from PyPI and cached)."""
    pytest.importorskip("vllm")
    port = free_port()
    process = start_server(["--policy", policy], tmp_path / "serve.log", port)
    try:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        question = {"model": "SmolLM2-135M-Instruct", "temperature": 0, "max_tokens": 40,
                    "messages": [{"role": "user", "content": "What is the capital of France?"}]}
        plain = httpx.post(url, json=question, timeout=120).json()["choices"][0]
        assert "Paris" in plain["message"]["content"] and plain["finish_reason"] == "stop"
        with_slo = httpx.post(url, timeout=120, json={
            **question, "messages": [{"role": "user", "content": "Name a primary colour."}],
            "vllm_xargs": {"slo_class": "deadline", "deadline_s": 60, "app": "chat/Alpaca"}}).json()["choices"][0]
        assert len(with_slo["message"]["content"].split()) >= 2 and with_slo["finish_reason"] in ("stop", "length")
    finally:
        process.stop()
