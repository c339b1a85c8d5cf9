"""The SLO front end (ASGI middleware) in front of a stand-in for vLLM's routes: validation, limits,
overload refusals, and ladders from a real estimator HTTP server that is fast, slow, broken or gone."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from tempo.serving.vllm.config import ServeConfig
from tempo.serving.vllm.frontend import SLOMiddleware, prompt_of
from tempo.serving.vllm.slo_fields import ESTIMATE_PROMPT_TOKENS_KEY, SKETCH_KEY, ladder_from_xargs

from tests.estimator_stub import StubEstimator

CHAT = "/v1/chat/completions"


class Downstream:
    """Stands in for vLLM's routes: records the body it got, optionally waits before answering."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.release: asyncio.Event | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        message = await receive()
        self.bodies.append(json.loads(message["body"]) if message["body"] else {})
        if self.release is not None:
            await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b"{}"})


def client(config: ServeConfig) -> tuple[httpx.AsyncClient, Downstream, SLOMiddleware]:
    downstream = Downstream()
    middleware = SLOMiddleware(downstream, config)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t"), downstream, middleware


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "Write a haiku about queues."}], **extra}


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_fields_are_normalised_and_a_ladder_and_sketch_added() -> None:
    async def go() -> None:
        http, down, _ = client(ServeConfig())
        async with http:
            r = await http.post(CHAT, json=chat(max_tokens=40, vllm_xargs={"deadline_s": 12, "app": "code/Mbpp",
                                                                           "other": 1}))
            assert r.status_code == 200
            xargs = down.bodies[-1]["vllm_xargs"]
            assert xargs["slo_class"] == "deadline" and xargs["deadline_s"] == 12 and xargs["other"] == 1
            ladder = ladder_from_xargs(xargs)
            assert ladder is not None and not ladder.fallback and ladder.initial <= 40  # capped at max_tokens
            assert json.loads(xargs[SKETCH_KEY])["n_chars"] == len("Write a haiku about queues.")
            assert xargs[ESTIMATE_PROMPT_TOKENS_KEY] == 7  # 27 characters: what the ladder was asked for
            r = await http.post(CHAT, json=chat(), headers={"x-slo-ttft-ms": "800"})
            assert down.bodies[-1]["vllm_xargs"]["ttft_slo_s"] == 0.8

    run(go())


@pytest.mark.parametrize(("body", "status", "fragment"), [
    (chat(vllm_xargs={"slo_class": "latency", "deadline_s": 3}), 400, "does not apply"),
    (chat(vllm_xargs={"tempo_ladder": [0, 1]}), 400, "reserved"),
    (chat(vllm_xargs={"ttft_slo_s": 0}), 400, "ttft_slo_s"),
    ({"model": "m", "messages": [{"role": "user", "content": "x" * 300}]}, 400, "prompt over"),
])
def test_bad_input_is_a_clear_4xx_before_any_work(body: dict[str, Any], status: int, fragment: str) -> None:
    async def go() -> None:
        http, down, _ = client(ServeConfig(max_prompt_chars=200))
        async with http:
            r = await http.post(CHAT, json=body)
            assert r.status_code == status and fragment in r.json()["error"]["message"]
            assert r.json()["error"]["code"] == status and down.bodies == []

    run(go())


def test_oversize_bodies_and_non_json_pass_or_fail_cleanly() -> None:
    async def go() -> None:
        http, down, _ = client(ServeConfig(max_body_bytes=2048))
        async with http:
            r = await http.post(CHAT, content=b"{" + b" " * 5000 + b"}")
            assert r.status_code == 413 and down.bodies == []
            r = await http.post(CHAT, content=b"[1, 2]")  # not ours to judge: vLLM answers it
            assert r.status_code == 200 and down.bodies[-1] == [1, 2]
            r = await http.get("/v1/models")
            assert r.status_code == 200

    run(go())


def test_overload_is_refused_at_once_with_a_reason() -> None:
    async def go() -> None:
        http, down, middleware = client(ServeConfig(max_in_flight=2))
        down.release = asyncio.Event()
        async with http:
            held = [asyncio.create_task(http.post(CHAT, json=chat())) for _ in range(2)]
            while middleware.in_flight < 2:
                await asyncio.sleep(0.01)
            started = time.perf_counter()
            r = await http.post(CHAT, json=chat())
            elapsed = time.perf_counter() - started
            assert r.status_code == 503 and r.headers["x-tempo-request-dropped-reason"] == "queue-full"
            assert "overloaded" in r.json()["error"]["message"] and elapsed < 1.0  # not queued behind the others
            down.release.set()
            assert [t.status_code for t in await asyncio.gather(*held)] == [200, 200]
            assert middleware.in_flight == 0

    run(go())


def test_prompt_text_of_chat_and_completions() -> None:
    parts = {"messages": [{"role": "system", "content": "be brief"},
                          {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url"}]}]}
    assert prompt_of(parts, CHAT) == ("be brief\nhi", None)
    assert prompt_of({"prompt": [1, 2, 3]}, "/v1/completions") == (None, 3)
    assert prompt_of({"prompt": ["a", "b"]}, "/v1/completions") == ("a", None)


# ---------------------------------------------------------------- the estimator: fast, slow, broken, gone
@pytest.fixture()
def stub() -> Iterator[StubEstimator]:
    server = StubEstimator()
    yield server
    server.close()


@pytest.mark.parametrize("mode", ["ok", "slow", "garbage", "absurd", "gone"])
def test_the_estimator_never_holds_serving_back(stub: StubEstimator, mode: str) -> None:
    url = stub.url
    if mode == "gone":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            url = f"http://127.0.0.1:{s.getsockname()[1]}"  # closed: connection refused
    else:
        stub.mode = mode

    async def go() -> None:
        http, down, _ = client(ServeConfig(estimator_url=url, estimator_timeout_s=0.1))
        async with http:
            started = time.perf_counter()
            r = await http.post(CHAT, json=chat(vllm_xargs={"deadline_s": 10}))
            elapsed = time.perf_counter() - started
        assert r.status_code == 200 and elapsed < 2.0  # the slow stub takes 3 s; the timeout is 0.1 s
        ladder = ladder_from_xargs(down.bodies[-1]["vllm_xargs"])
        assert ladder is not None
        if mode == "ok":
            assert ladder.steps == ((0, 33), (10, 40)) and not ladder.fallback
        else:
            assert ladder.fallback  # the local empirical ladder, flagged

    run(go())


def test_calls_of_admitted_jobs_get_the_reserve_and_a_refused_job_is_dropped_whole() -> None:
    def compound(job: str, stage: int) -> dict[str, Any]:
        return chat(vllm_xargs={"slo_class": "compound", "job_id": job, "stage": stage, "job_deadline_s": 60})

    async def go() -> None:
        http, down, middleware = client(ServeConfig(max_in_flight=4, job_reserve=0.5))
        down.release = asyncio.Event()
        async with http:
            held = [asyncio.create_task(http.post(CHAT, json=body)) for body in (compound("a", 0), chat())]
            while middleware.in_flight < 2:
                await asyncio.sleep(0.01)
            refused = await http.post(CHAT, json=chat())  # 2 of 4 in flight: the rest is the jobs' reserve
            assert refused.status_code == 503 and refused.headers["x-tempo-request-dropped-reason"] == "queue-full"
            assert (await http.post(CHAT, json=compound("b", 0))).status_code == 503  # a new job: no reserve
            held.append(asyncio.create_task(http.post(CHAT, json=compound("a", 1))))  # job a: admitted
            while middleware.in_flight < 3:
                await asyncio.sleep(0.01)
            down.release.set()
            assert [t.status_code for t in await asyncio.gather(*held)] == [200, 200, 200]
            dropped = await http.post(CHAT, json=compound("b", 1))  # b lost a call: the whole job is refused
            assert dropped.status_code == 503 and dropped.headers["x-tempo-request-dropped-reason"] == "job-dropped"
            assert "dropped" in dropped.json()["error"]["message"]

    run(go())


def test_start_up_builds_the_request_path_and_watches_the_loop() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        return None

    middleware = SLOMiddleware(app, ServeConfig())
    # built before the heap is frozen: never on a request (the fallback ladders' fit takes seconds)
    assert middleware._bounds is not None and middleware._metrics is not None

    async def start_up() -> None:
        await middleware({"type": "lifespan"}, None, None)
        task = middleware._loop_lag
        assert task is not None and not task.done()
        await middleware({"type": "lifespan"}, None, None)
        assert middleware._loop_lag is task  # one watcher
        await asyncio.sleep(0.05)
        task.cancel()

    run(start_up())
