"""The SLO front end: an ASGI middleware in vLLM's OpenAI server (``--middleware ...SLOMiddleware``).

Routes outside ``SERVED_PATHS`` (the two below and read-only operations) get a 404. For
``POST /v1/chat/completions`` and ``/v1/completions``, before vLLM's routes:

1. **overload**: beyond ``max_in_flight`` requests admitted and not yet answered, answer 503 at once with
   the reason (``x-tempo-request-dropped-reason: queue-full``, ``retry-after``), before any work; a share
   of the slots (``job_reserve``) is kept for calls of compound jobs already admitted, and a job is
   refused whole (``job-dropped``), not call by call (``admission``);
2. **limits**: a body over ``max_body_bytes`` is refused with 413, a prompt over ``max_prompt_chars`` with
   400, before anything is parsed or estimated;
3. **SLO fields**: ``vllm_xargs`` and the llm-d headers are validated (``slo_fields``); a bad one is a 400
   with a one-line message in OpenAI's error shape, never a 500;
4. **bounds**: the length ladder from the estimator service (async, pooled, a hard timeout), or from the
   local empirical ladders, flagged ``fallback``, when the service is slow, down or answers nonsense;
   serving never waits on it beyond the timeout;
5. the body is rewritten: normalised SLO fields, the ladder and the prompt's hashed sketch (for the
   completion record; the text itself never leaves this process unless configured) under reserved
   ``tempo_*`` keys of ``vllm_xargs``, which the engine core's scheduler reads.

Bodies that are not JSON objects pass through unchanged: vLLM answers them with its own 400.
A pure ASGI class (not ``BaseHTTPMiddleware``) so streamed responses pass through untouched.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from tempo.scheduler.bounds import BoundLadder, BoundQuery, prompt_tokens_of_text
from tempo.scheduler.slo import SLOClass
from tempo.serving.vllm import gc_pauses, loop_lag
from tempo.serving.vllm.admission import QUEUE_FULL, JobAdmission
from tempo.serving.vllm.config import ServeConfig
from tempo.serving.vllm.slo_fields import (
    ESTIMATE_PROMPT_TOKENS_KEY,
    SKETCH_KEY,
    RequestSLO,
    SLOFieldError,
    ladder_to_xargs,
    parse_request_slo,
)

log = logging.getLogger("tempo.serving.frontend")
PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
# everything else vLLM routes is refused with 404: generation routes that would bypass the SLO checks and the
# overload limit (/invocations, /v1/responses, /v1/messages, /v1/chat/completions/batch, ...) and operations
# Tempo does not serve (/scale_elastic_ep answers 500, /v1/systemone 501)
SERVED_PATHS = PATHS | frozenset({"/health", "/ping", "/version", "/load", "/metrics", "/metrics/", "/v1/models",
                                  "/tokenize", "/detokenize", "/openapi.json", "/docs", "/docs/oauth2-redirect",
                                  "/redoc"})
DROPPED_HEADER = b"x-tempo-request-dropped-reason"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class RequestRefused(Exception):
    """Answer the client with ``status`` and an OpenAI-shaped error."""

    def __init__(self, status: int, message: str, kind: str, param: str | None = None,
                 headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers


def prompt_of(body: dict[str, Any], path: str) -> tuple[str | None, int | None]:
    """The prompt text (what the estimator reads) and its token count when the client gave token ids."""
    if path.endswith("/chat/completions"):
        parts: list[str] = []
        for message in body.get("messages") or []:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):
                parts.extend(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text")
        return "\n".join(parts), None
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return str(prompt[0]), None
        if all(isinstance(p, int) for p in prompt):
            return None, len(prompt)
        if isinstance(prompt[0], list):
            return None, len(prompt[0])
    return None, None


def _max_tokens(body: dict[str, Any]) -> int | None:
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


class SLOMiddleware:
    """See the module docstring. vLLM builds it with ``app.add_middleware(cls)``: configuration comes from
    ``TEMPO_SERVE_CONFIG``."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]],
                 config: ServeConfig | None = None) -> None:
        self.app = app
        self.config = config or ServeConfig.from_env()
        self.defaults = self.config.slo_defaults()
        self.in_flight = 0
        self.admission = JobAdmission(self.config.max_in_flight, self.config.job_reserve_slots)
        self._bounds: Any = None
        self._client: Any = None
        self._metrics: Any = None
        self._loop_lag: Any = None  # the watcher task (loop_lag), started at lifespan start-up
        # Starlette builds its middleware at the first ASGI call (the lifespan start-up): the engine is up.
        # What the request path builds lazily is built now, so the freeze takes it too: a collection would
        # traverse it all again, and the fallback ladders' ~2 s fit would stop the loop at the first fallback.
        _ = self.metrics, self.bounds
        import tempo.models.features  # the prompt sketch of every admitted request

        if self.config.estimator_url:
            import tempo.estimator.client  # noqa: F401
        gc_pauses.install(freeze=self.config.freeze_gc)

    # -- lazily built (heavy imports, event-loop bound clients) --------------------------------------
    @property
    def bounds(self) -> Any:
        if self._bounds is None:
            from tempo.serving.vllm.local_bounds import local_bounds

            cfg = self.config
            self._bounds = local_bounds(cfg.bounds_model, cfg.quantile, cfg.local_bounds)
        return self._bounds

    @property
    def metrics(self) -> Any:
        if self._metrics is None:
            from tempo.serving.vllm.metrics import frontend_metrics

            self._metrics = frontend_metrics()
        return self._metrics

    def _estimator(self) -> Any:
        if self._client is None and self.config.estimator_url:
            from tempo.estimator.client import EstimatorClient

            def fallback(query: BoundQuery, max_tokens: int | None) -> BoundLadder:
                return self.bounds.ladder(query.slo_class, query.app, max_tokens, fallback=True)

            self._client = EstimatorClient(self.config.estimator_url, timeout_s=self.config.estimator_timeout_s,
                                           quantile=self.config.quantile, fallback=fallback)
        return self._client

    # -- ASGI ------------------------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") == "lifespan" and self._loop_lag is None:  # the server's own loop, once
            self._loop_lag = loop_lag.start(self.metrics.loop_lag_seconds, self.metrics.loop_lag_max)
        if gc_pauses.pending():  # pauses timed since the last request (a /metrics scrape sees them all)
            gc_pauses.drain(self.metrics.gc_pause_seconds)
        if scope.get("type") == "http" and scope.get("path") not in SERVED_PATHS:
            await _error(send, RequestRefused(404, f"tempo serve does not serve {str(scope.get('path'))[:200]}",
                                              "NotFoundError"))
            return
        if scope.get("type") != "http" or scope.get("method") != "POST" or scope.get("path") not in PATHS:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.config.max_in_flight:  # before the body is read: no job is known to drop
            await _error(send, self._overloaded(QUEUE_FULL))
            return
        self.in_flight += 1
        try:
            try:
                body = await self._read_body(receive)
                headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
                new_body = await self.prepare(body, headers, scope["path"])
            except RequestRefused as refused:
                await _error(send, refused)
                return
            if new_body is not body:
                scope = dict(scope)
                scope["headers"] = [(k, v) for k, v in scope.get("headers", [])
                                    if k.lower() not in (b"content-length", b"transfer-encoding")]
                scope["headers"].append((b"content-length", str(len(new_body)).encode()))
            await self.app(scope, _replay(new_body, receive), send)
        finally:
            self.in_flight -= 1

    def _overloaded(self, reason: str) -> RequestRefused:
        self.metrics.refused.labels(reason).inc()
        message = (f"tempo: overloaded: {self.in_flight} requests in flight (limit {self.config.max_in_flight})"
                   if reason == QUEUE_FULL else "tempo: a call of this job was refused earlier: the job is dropped")
        return RequestRefused(503, f"{message}; retry later", "ServiceUnavailableError",
                              headers=((DROPPED_HEADER, reason.encode()), (b"retry-after", b"1")))

    async def _read_body(self, receive: Receive) -> bytes:
        limit, chunks, size = self.config.max_body_bytes, [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise RequestRefused(400, "client disconnected", "BadRequestError")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                self.metrics.refused.labels("body-too-large").inc()
                raise RequestRefused(413, f"request body over {limit} bytes", "RequestTooLargeError")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def prepare(self, body: bytes, headers: dict[str, str], path: str) -> bytes:
        """The body to hand to vLLM (``body`` itself when it is not ours to touch); RequestRefused on bad input."""
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return body
        if not isinstance(data, dict):
            return body
        xargs = data.get("vllm_xargs")
        if xargs is not None and not isinstance(xargs, dict):
            return body
        try:
            rslo = parse_request_slo(xargs, headers, self.defaults)
        except SLOFieldError as exc:
            self.metrics.bad_requests.inc()
            raise RequestRefused(400, str(exc), "BadRequestError", exc.param) from None
        # this request is counted in in_flight while it is prepared
        refused = self.admission.decide(rslo.job_id if rslo.slo.slo_class is SLOClass.COMPOUND else None,
                                        max(0, self.in_flight - 1))
        if refused is not None:
            raise self._overloaded(refused)
        text, prompt_tokens = prompt_of(data, path)
        if text is not None and len(text) > self.config.max_prompt_chars:
            self.metrics.refused.labels("prompt-too-long").inc()
            raise RequestRefused(400, f"prompt over {self.config.max_prompt_chars} characters", "BadRequestError",
                                 "messages" if "messages" in data else "prompt")
        max_tokens = _max_tokens(data)
        if prompt_tokens is None:
            prompt_tokens = prompt_tokens_of_text(text)
        ladder = await self.ladder(rslo, text, prompt_tokens, max_tokens)
        out = {k: v for k, v in (xargs or {}).items() if k not in rslo.to_xargs()}
        out.update(rslo.to_xargs())
        out.update(ladder_to_xargs(ladder))
        out[ESTIMATE_PROMPT_TOKENS_KEY] = prompt_tokens  # the completion record carries it for the learner
        if text is not None:
            out[SKETCH_KEY] = _sketch(text)
        data["vllm_xargs"] = out
        return json.dumps(data).encode()

    async def ladder(self, rslo: RequestSLO, text: str | None, prompt_tokens: int,
                     max_tokens: int | None) -> BoundLadder:
        cls = rslo.slo.slo_class
        client = self._estimator()
        if client is None:
            self.metrics.estimates.labels("local").inc()
            return self.bounds.ladder(cls, rslo.app, max_tokens)
        query = BoundQuery("q", prompt_tokens, cls, rslo.app,
                           self.config.estimator_model or self.config.served_model, text)
        started = time.perf_counter()
        before = client.fallbacks
        # the client's own timeout is per phase; this caps the whole call (without cancelling it)
        ladder: BoundLadder = (await client.ladders_within([query], [max_tokens], self.config.estimator_timeout_s))[0]
        fell_back = client.fallbacks != before
        self.metrics.estimate_seconds.observe(time.perf_counter() - started)
        self.metrics.estimates.labels("fallback" if fell_back else "ok").inc()
        if max_tokens is not None:
            from tempo.serving.vllm.local_bounds import cap_ladder

            ladder = cap_ladder(ladder, max_tokens)  # whatever the service says, a response ends by max_tokens
        return ladder


def _sketch(text: str) -> str:
    """The prompt's hashed n-gram sketch, packed (what completion records keep instead of the text)."""
    from tempo.models.features import FeatureSpec, PromptSketch, pack_sketch

    spec = FeatureSpec()
    return json.dumps(pack_sketch(PromptSketch.of(text, spec), spec), separators=(",", ":"))


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _error(send: Send, refused: RequestRefused) -> None:
    payload = json.dumps({"error": {"message": refused.message, "type": refused.kind, "param": refused.param,
                                    "code": refused.status}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
               *refused.headers]
    await send({"type": "http.response.start", "status": refused.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload, "more_body": False})
