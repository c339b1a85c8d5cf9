"""Fuzz ``tempo serve`` (vLLM's OpenAI server with Tempo's SLO middleware) on the tiny random Llama.

vLLM's OpenAPI schema is patched before anything is generated, so that the cases exercise Tempo's own input
handling, not only vLLM's:

- ``vllm_xargs`` (a free dict in vLLM's schema) is described as Tempo's SLO fields (``slo_fields``): one
  branch per class with the fields it takes, one without ``slo_class`` (the class is inferred) and null (the
  default class); it is made required (with 60-odd optional fields, an optional one is seldom generated), so
  positive cases are well-formed objectives and negative ones are bad classes, out-of-range seconds, bad
  names, fields the class does not take;
- ``x-slo-ttft-ms`` / ``x-slo-tpot-ms`` become optional header parameters of the two generation routes;
- ``model`` is the served name (negative cases may still send another);
- ``max_tokens`` and its relatives (and ``n``, ``min_tokens``) are capped at ``MAX_TOKENS`` in the schema and
  clamped again before a case is sent (negative cases may be out of the schema), so that every request is
  cheap on the CPU engine; a chat request naming no length gets ``MAX_TOKENS``.
"""

from __future__ import annotations

import copy
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tempo.serving.fuzz.core import FuzzTarget, run_fuzz
from tempo.serving.vllm.slo_fields import MAX_SLO_S, MIN_SLO_S, TPOT_HEADER, TTFT_HEADER

from tempo.errors import TempoError

MAX_TOKENS = 8
MAX_N = 2
GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")  # the routes Tempo's middleware judges
GENERATION_WEIGHT = 10.0  # their share of the budget against 1 for every other route Tempo serves
REFUSED_WEIGHT = 0.25  # routes the middleware refuses with 404 (``frontend.SERVED_PATHS``)
LENGTH_KEYS = ("max_tokens", "max_completion_tokens", "max_output_tokens", "min_tokens")
COUNT_KEYS = ("n", "best_of")
STARTUP_S = 1200.0  # a loaded 2-core machine has taken over 10 minutes


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def slo_xargs_schema() -> dict[str, Any]:
    """Tempo's SLO fields as a JSON schema for ``vllm_xargs`` (what ``slo_fields.SLOFields`` accepts)."""
    seconds = {"type": "number", "minimum": MIN_SLO_S, "maximum": MAX_SLO_S}
    name = {"type": "string", "minLength": 1, "maxLength": 200, "pattern": r"^[\x21-\x7e]+$"}
    stage = {"type": "integer", "minimum": 0, "maximum": 100_000}
    fields = {"latency": {"ttft_slo_s": seconds, "tbt_slo_s": seconds}, "deadline": {"deadline_s": seconds},
              "compound": {"job_id": name, "stage": stage, "job_deadline_s": seconds}, "best_effort": {}}
    branches: list[dict[str, Any]] = []
    for cls, own in fields.items():
        branches.append({"type": "object", "properties": {"slo_class": {"enum": [cls]}, **own, "app": name},
                         "required": ["slo_class", *(["job_id"] if cls == "compound" else [])],
                         "additionalProperties": False})
    every = {k: v for own in fields.values() for k, v in own.items()}
    branches.append({"type": "object", "properties": {**every, "app": name}, "additionalProperties": False})
    return {"anyOf": [*branches, {"type": "null"}], "title": "Vllm Xargs (Tempo SLO fields)"}


def _resolve(raw: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
        resolved: dict[str, Any] = raw["components"]["schemas"][ref.rsplit("/", 1)[1]]
        return resolved
    return schema


def patch_schema(raw: dict[str, Any], served_model: str, max_tokens: int = MAX_TOKENS) -> dict[str, Any]:
    """A copy of vLLM's OpenAPI schema ``raw`` with Tempo's SLO fields, headers and the caps (module docstring)."""
    raw = copy.deepcopy(raw)
    header_params = [
        {"name": TTFT_HEADER, "in": "header", "required": False,
         "schema": {"type": "number", "minimum": MIN_SLO_S * 1000, "maximum": MAX_SLO_S * 1000}},
        {"name": TPOT_HEADER, "in": "header", "required": False,
         "schema": {"type": "number", "minimum": MIN_SLO_S * 1000, "maximum": MAX_SLO_S * 1000}},
    ]
    for path in GENERATION_PATHS:
        operation = raw.get("paths", {}).get(path, {}).get("post")
        if operation is None:
            raise TempoError(f"the served OpenAPI schema has no POST {path}")
        operation["parameters"] = [*operation.get("parameters", []), *copy.deepcopy(header_params)]
    for body in raw.get("components", {}).get("schemas", {}).values():
        properties = body.get("properties") if isinstance(body, dict) else None
        if not isinstance(properties, dict):
            continue
        if "vllm_xargs" in properties:
            properties["vllm_xargs"] = slo_xargs_schema()  # required, null allowed: an optional one is rare
            body["required"] = sorted({*body.get("required", []), "vllm_xargs"})
        if "model" in properties and ("vllm_xargs" in properties or "max_tokens" in properties):
            required = "model" in body.get("required", [])
            properties["model"] = {"enum": [served_model]} if required else _nullable({"enum": [served_model]})
        for key in LENGTH_KEYS:
            if key in properties:
                bounded = {"type": "integer", "minimum": 0 if key == "min_tokens" else 1, "maximum": max_tokens}
                properties[key] = bounded if key in body.get("required", []) else _nullable(bounded)
        for key in COUNT_KEYS:
            if key in properties:
                properties[key] = _nullable({"type": "integer", "minimum": 1, "maximum": MAX_N})
    schemas = raw.get("components", {}).get("schemas", {})
    chat, completion = schemas.get("ChatCompletionRequest"), schemas.get("CompletionRequest")
    if chat is not None and "messages" in chat.get("properties", {}):
        chat["properties"]["messages"]["minItems"] = 1  # an empty conversation is vLLM's 400, every time
    if completion is not None and "prompt" in completion.get("properties", {}):
        prompt = completion["properties"]["prompt"]  # optional and nullable in vLLM's schema, needed in fact
        options = [o for o in prompt.get("anyOf", []) if o.get("type") != "null"]
        for option in options:
            option["minItems" if option.get("type") == "array" else "minLength"] = 1
        completion["properties"]["prompt"] = {"anyOf": options, "title": prompt.get("title", "Prompt")}
        completion["required"] = sorted({*completion.get("required", []), "prompt"})
    return raw


def clamp_body(body: Any, path: str, max_tokens: int = MAX_TOKENS) -> None:
    """Cap lengths and counts of a (possibly out-of-schema) body in place; lower or wrong-typed values stay."""
    if not isinstance(body, dict):
        return
    for key in LENGTH_KEYS:
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > max_tokens:
            body[key] = max_tokens
    for key in COUNT_KEYS:
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > MAX_N:
            body[key] = MAX_N
    if path.endswith("/chat/completions") and body.get("max_tokens") is None \
            and body.get("max_completion_tokens") is None:
        body["max_tokens"] = max_tokens  # else vLLM decodes up to the context length


def serve_target(url: str, served_model: str = "tiny-llama") -> FuzzTarget:
    import httpx
    import schemathesis

    raw = httpx.get(f"{url}/openapi.json", timeout=30).json()
    schema = schemathesis.openapi.from_dict(patch_schema(raw, served_model))
    slo_inputs: Counter[str] = Counter()  # generation requests, and those carrying SLO fields or headers

    def prepare(case: Any, mode: str) -> None:
        clamp_body(case.body, case.path)
        if case.path in GENERATION_PATHS:
            body, headers = case.body, case.headers or {}
            xargs = body.get("vllm_xargs") if isinstance(body, dict) else None
            slo_inputs["with_vllm_xargs"] += isinstance(xargs, dict) and bool(xargs)
            slo_inputs["with_slo_headers"] += any(h.lower() in (TTFT_HEADER, TPOT_HEADER) for h in headers)
            slo_inputs["generation_requests"] += 1

    return FuzzTarget("serve", schema, url, prepare=prepare, weight=serve_weight, timeout_s=120,
                      extra={"slo_inputs": slo_inputs})


def serve_weight(label: str) -> float:
    """Share of the budget: most of it to the routes Tempo judges, little to those its middleware refuses."""
    from tempo.serving.vllm.frontend import SERVED_PATHS

    path = label.split(" ", 1)[1]
    return GENERATION_WEIGHT if path in GENERATION_PATHS else 1.0 if path in SERVED_PATHS else REFUSED_WEIGHT


def fuzz_serve_at(url: str, requests: int, seed: int = 0, served_model: str = "tiny-llama",
                  progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Fuzz a ``tempo serve`` already running at ``url``; the report."""
    report = run_fuzz(serve_target(url, served_model), requests, seed, progress)
    report["url"] = url
    return report


ENGINE_ARGS = ("--max-model-len", "512")


def fuzz_serve(requests: int, seed: int = 0, model: str = "tiny", engine_args: tuple[str, ...] = ENGINE_ARGS,
               log: Path | None = None, progress: Callable[[str], None] | None = None,
               startup_s: float = STARTUP_S) -> dict[str, Any]:
    """Start ``tempo serve --model tiny`` (a child process, stopped after), fuzz it; the report."""
    from tempo.serving.vllm.launch import ManagedServer
    from tempo.serving.vllm.server import resolve_model

    _, served = resolve_model(model)
    log = log or Path(tempfile.mkdtemp(prefix="tempo-fuzz-")) / "serve.log"
    if progress is not None:
        progress(f"starting tempo serve --model {model} (log {log})")
    with ManagedServer(["--model", model, "--kv-cache-gib", "1", "--", *engine_args], log,
                       startup_s=startup_s) as server:
        report = fuzz_serve_at(server.url, requests, seed, served, progress)
        alive = server.process is not None and server.process.poll() is None
    report["server_alive_after"] = alive
    report["log"] = str(log)
    return report
