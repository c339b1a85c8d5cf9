"""The workload replay client against a stand-in server: arrival times, compound stages released when their
dependencies finish, a rejected call stops its job, token times and refusals as the client sees them."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from tempo.scheduler.goodput import account
from tempo.serving.bench.engine_client import ReplayConfig, replay, request_body
from tempo.serving.sim.testing import make_request

from tests.conftest import free_port, serve_asgi


class FakeServer:
    """Streams ``max_tokens`` tokens 10 ms apart; answers 'abort' for requests whose id starts with 'rej',
    503 for 'busy'."""

    def __init__(self) -> None:
        self.received: list[tuple[float, str, dict[str, Any]]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        body = json.loads((await receive())["body"])
        rid = dict(scope["headers"])[b"x-request-id"].decode()
        self.received.append((time.monotonic(), rid, body))
        if rid.startswith("busy"):
            await send({"type": "http.response.start", "status": 503, "headers": []})
            await send({"type": "http.response.body", "body": b'{"error": {"message": "overloaded"}}'})
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        n = 0 if rid.startswith("rej") else body["max_tokens"]
        for i in range(1, n + 1):
            await asyncio.sleep(0.01)
            chunk = {"choices": [{"text": "x", "finish_reason": "length" if i == n else None}],
                     "usage": {"prompt_tokens": len(body["prompt"]), "completion_tokens": i}}
            await send({"type": "http.response.body", "body": f"data: {json.dumps(chunk)}\n\n".encode(),
                        "more_body": True})
        if n == 0:
            chunk = {"choices": [{"text": "", "finish_reason": "abort", "stop_reason": "tempo: rejected: late"}]}
            await send({"type": "http.response.body", "body": f"data: {json.dumps(chunk)}\n\n".encode(),
                        "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


def job(prefix: str, first_ids: tuple[str, str] = ("0.0", "0.1")) -> list[Any]:
    first = [make_request(f"{prefix}{k}", "compound", arrival_s=0.1, prompt_tokens=30, output_tokens=3,
                          job_id=prefix, stage=0) for k in first_ids]
    second = make_request(f"{prefix}1.0", "compound", arrival_s=0.1, prompt_tokens=30, output_tokens=2,
                          job_id=prefix, stage=1, depends_on=[w.id for w in first])
    return [*first, second]


def run(workload: list[Any]) -> tuple[Any, FakeServer]:
    server = FakeServer()
    with serve_asgi(server) as url:
        return asyncio.run(replay(workload, ReplayConfig(url, "m", start_delay_s=0.05))), server


def test_stages_are_released_after_their_dependencies_and_times_are_the_clients() -> None:
    chat = make_request("c", "latency", arrival_s=0.3, prompt_tokens=12, output_tokens=5)
    result, server = run([chat, *job("J.")])
    order = [rid for _, rid, _ in server.received]
    assert order.index("J.1.0") > max(order.index("J.0.0"), order.index("J.0.1"))
    sent = {rid: at for at, rid, _ in server.received}
    assert 0.15 < sent["c"] - sent["J.0.0"] < 0.35  # sent at its own arrival time
    outcomes = {o.request_id: o for o in result.outcomes}
    assert outcomes["c"].finished and len(outcomes["c"].token_times_s) == 5
    assert outcomes["J.1.0"].arrival_s >= max(outcomes["J.0.0"].token_times_s)  # released when stage 0 ended
    assert outcomes["J.1.0"].job_arrival_s == 0.1
    body = request_body(chat, ReplayConfig("u", "m"))
    assert body["vllm_xargs"]["slo_class"] == "latency" and body["ignore_eos"] and len(body["prompt"]) == 12
    assert account(result.outcomes, duration_s=1.0).per_class  # the simulator's accounting takes them


def test_a_rejected_or_refused_call_stops_its_job() -> None:
    busy = make_request("busy", "deadline", arrival_s=0.1, output_tokens=4)
    result, server = run([*job("rejK.", ("0.0", "0.1")), busy])  # 'rej...' calls are rejected by the server
    assert "rejK.1.0" not in [rid for _, rid, _ in server.received]
    assert result.rejected >= 1 and result.refused == 1 and result.rejected + result.never_sent == 3
    assert not any(o.finished for o in result.outcomes)


def test_the_live_stop_switch_sends_nothing_more_and_lets_requests_in_flight_finish() -> None:
    import threading

    from tempo.serving.bench.engine_client import LiveReplay

    workload = [make_request(f"r{i}", "deadline", arrival_s=0.05 * i, output_tokens=20) for i in range(200)]
    live = LiveReplay()
    with serve_asgi(FakeServer()) as url:
        threading.Timer(0.3, live.stop.set).start()
        started = time.monotonic()
        result = asyncio.run(replay(workload, ReplayConfig(url, "m", start_delay_s=0.0, live=live)))
    assert time.monotonic() - started < 2.0  # not the 10 s of arrivals
    sent = [o for o in live.observed.values() if o.sent_s is not None]
    assert 3 <= len(sent) <= 12 and live.t0 is not None
    assert all(o.finish_reason == "length" and len(o.token_times_s) == 20 for o in sent)  # none cut short
    assert result.observed is live.observed


def test_forced_lengths_with_text_go_to_the_chat_route_with_ignore_eos() -> None:
    w = make_request("c", "latency", prompt_tokens=12, output_tokens=5000).model_copy(update={"prompt": "hello"})
    body = request_body(w, ReplayConfig("u", "m", forced_with_text=True, max_tokens_cap=300))
    assert body["messages"][0]["content"] == "hello" and body["ignore_eos"] and body["max_tokens"] == 300
    no_text = request_body(make_request("d", "deadline", output_tokens=7),
                           ReplayConfig("u", "m", forced_with_text=True))
    assert "prompt" in no_text and no_text["max_tokens"] == 7


def test_a_server_that_is_not_listening_is_a_failed_connection_not_an_answer() -> None:
    result = asyncio.run(replay([make_request("r", "deadline", arrival_s=0.0, output_tokens=3)],
                                ReplayConfig(f"http://127.0.0.1:{free_port()}", "m", start_delay_s=0.0)))
    seen = result.observed["r"]
    assert seen.connect_failed and seen.status is None and seen.error and result.errors == 1
    assert not result.outcomes[0].finished


def test_a_malformed_stream_is_an_error_of_that_request_not_of_the_replay() -> None:
    async def garbage(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data: {not json\n\n"})

    with serve_asgi(garbage) as url:
        result = asyncio.run(replay([make_request("r", "deadline", arrival_s=0.0, output_tokens=3)],
                                    ReplayConfig(url, "m", start_delay_s=0.0)))
    seen = result.observed["r"]
    assert seen.error and not seen.connect_failed and not result.outcomes[0].finished
