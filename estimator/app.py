"""The estimator's FastAPI app: ``create_app(settings)``; Redis, the served model and the background loops
are opened in the lifespan (nothing heavy at import).

Endpoints (DESIGN section 3): estimates from memory (never touch Redis), completions into the Redis
stream, the model registry, health and Prometheus metrics. Admin endpoints need ``Authorization: Bearer``
with the configured token. Errors are ``{"detail": ...}``; an unexpected error is logged and answered
with a generic 500, never a stack trace.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Path, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from tempo.estimator.batcher import MicroBatcher
from tempo.estimator.engine import Estimator, FallbackBounds, ServedModel
from tempo.estimator.jobs import bootstrap_store
from tempo.estimator.metrics import Message, Metrics, MetricsMiddleware, Scope
from tempo.estimator.schemas import (
    ActivateResponse,
    BatchEstimateRequest,
    BatchEstimateResponse,
    CompletionAccepted,
    CompletionRecord,
    EstimateRequest,
    EstimateResponse,
    Health,
    JobEstimateRequest,
    JobEstimateResponse,
    ModelsResponse,
    ModelVersion,
    RefineRequest,
    RefineResponse,
    RetrainAccepted,
    RetrainRequest,
)
from tempo.estimator.settings import Settings, get_settings
from tempo.estimator.store import REDIS_ERRORS, Store, UnknownVersion
from tempo.estimator.worker import Background, OnlineWorker, RegistryWatcher
from tempo.models.artifact import ArtifactError
from tempo.models.features import pack_sketch, unpack_sketch
from tempo.scheduler.bounds import BoundLadder

from tempo.errors import TempoError

log = logging.getLogger("tempo.estimator")

MAX_BODY_BYTES = 8 << 20


# -- dependencies ------------------------------------------------------------------------------------
def settings_dep(request: Request) -> Settings:
    return request.app.state.settings


def estimator_dep(request: Request) -> Estimator:
    return request.app.state.estimator


def store_dep(request: Request) -> Store:
    return request.app.state.store


def metrics_dep(request: Request) -> Metrics:
    return request.app.state.metrics


SettingsDep = Annotated[Settings, Depends(settings_dep)]
EstimatorDep = Annotated[Estimator, Depends(estimator_dep)]
StoreDep = Annotated[Store, Depends(store_dep)]
MetricsDep = Annotated[Metrics, Depends(metrics_dep)]


def require_admin(request: Request, settings: SettingsDep) -> None:
    """Bearer token from settings: 401 without credentials, 403 with wrong ones or none configured."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "admin endpoint: send Authorization: Bearer <token>",
                            headers={"WWW-Authenticate": "Bearer"})
    configured = settings.admin_token
    if configured is None or not configured.get_secret_value():
        raise HTTPException(status.HTTP_403_FORBIDDEN, "admin endpoints are disabled (no admin token configured)")
    if not secrets.compare_digest(token.encode("utf-8", "replace"), configured.get_secret_value().encode()):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "invalid admin token")


AdminDep = Depends(require_admin)


def redis_unavailable(what: str) -> HTTPException:
    return HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"{what}: Redis is unavailable, retry later")


# -- routers -----------------------------------------------------------------------------------------
estimates = APIRouter(prefix="/v1", tags=["estimates"])


def _checked(estimator: Estimator, requests: list[EstimateRequest]) -> None:
    for r in requests:
        if (message := estimator.check_quantile(r.quantile)) is not None:
            raise HTTPException(422, message)


@estimates.post("/estimate", response_model=EstimateResponse)
async def estimate(body: EstimateRequest, request: Request, estimator: EstimatorDep,
                   metrics: MetricsDep) -> EstimateResponse:
    _checked(estimator, [body])
    result: EstimateResponse = await request.app.state.batcher.submit(body)
    metrics.estimates.labels(result.source).inc()
    return result


@estimates.post("/estimate:batch", response_model=BatchEstimateResponse)
def estimate_batch(body: BatchEstimateRequest, estimator: EstimatorDep, metrics: MetricsDep,
                   settings: SettingsDep) -> BatchEstimateResponse:
    if len(body.requests) > settings.max_batch:
        raise HTTPException(422, f"at most {settings.max_batch} requests per batch")
    _checked(estimator, body.requests)
    results = estimator.estimate(body.requests)
    for r in results:
        metrics.estimates.labels(r.source).inc()
    return BatchEstimateResponse(estimates=results)


@estimates.post("/refine", response_model=RefineResponse)
async def refine(body: RefineRequest, estimator: EstimatorDep) -> RefineResponse:
    """The bound once ``generated`` tokens are out: from the given ladder, or a fresh estimate's."""
    _checked(estimator, [body.request])
    if body.ladder:
        try:
            ladder = BoundLadder(tuple((int(k), int(b)) for k, b in body.ladder), estimator.quantile)
        except ValueError as exc:
            raise HTTPException(422, f"invalid ladder: {exc}") from None
        version, fallback = estimator.version, False
    else:
        result = estimator.estimate([body.request])[0]
        ladder = BoundLadder(tuple(result.ladder), result.quantile, result.fallback)
        version, fallback = result.model_version, result.fallback
    bound = ladder.bound_at(body.generated, body.request.max_tokens)
    return RefineResponse(upper_bound=bound, remaining=bound - body.generated, generated=body.generated,
                          quantile=estimator.quantile, model_version=version, fallback=fallback)


@estimates.post("/jobs:estimate", response_model=JobEstimateResponse)
def estimate_job(body: JobEstimateRequest, estimator: EstimatorDep) -> JobEstimateResponse:
    """What a compound job has left after its current stage, matched against the graphs of past jobs of
    its app (from memory, like every estimate)."""
    history = [[(int(p), int(o)) for p, o in calls] for calls in body.history]
    found = estimator.estimate_job(body.app, body.stage, history, list(body.stage_prompts))
    phi = found.sub_deadline_fraction
    bound = found.bound
    return JobEstimateResponse(
        stages_after=int(bound["stages_after"]), decode_tokens_after=int(bound["decode_tokens_after"]),
        prefill_tokens_after=int(bound["prefill_tokens_after"]), tokens_after=found.mean["tokens_after"],
        decode_total_after=found.mean["decode_total_after"], prefill_total_after=found.mean["prefill_total_after"],
        median=found.median, sub_deadline_fraction=phi,
        stage_deadline_s=phi * body.job_deadline_s if phi is not None and body.job_deadline_s is not None else None,
        matched_jobs=round(found.samples, 2), fallback=found.fallback, quantile=estimator.quantile)


completions = APIRouter(prefix="/v1", tags=["completions"])


@completions.post("/completions", response_model=CompletionAccepted, status_code=status.HTTP_202_ACCEPTED)
def record_completion(body: CompletionRecord, store: StoreDep, estimator: EstimatorDep, metrics: MetricsDep,
                      settings: SettingsDep, response: Response) -> CompletionAccepted:
    """Append the record to the stream (once per request id); 503 when Redis is down (nothing is lost
    silently: the caller keeps the record and retries)."""
    record: dict[str, Any] = body.model_dump(exclude_none=True)
    if body.sketch is None:
        sketch = estimator.sketch(body.prompt)
    else:
        try:
            sketch = unpack_sketch(record["sketch"], estimator.hash_spec)
        except ValueError as exc:
            raise HTTPException(422, f"invalid sketch: {exc}") from None
    record["sketch"] = pack_sketch(sketch, estimator.hash_spec)
    if not settings.store_prompt_text:
        record.pop("prompt", None)
    try:
        stream_id = store.append_completion(record)
    except REDIS_ERRORS:
        metrics.completions.labels("unavailable").inc()
        raise redis_unavailable("completion not recorded") from None
    metrics.completions.labels("duplicate" if stream_id is None else "recorded").inc()
    if stream_id is None:
        response.status_code = status.HTTP_200_OK
    return CompletionAccepted(request_id=body.request_id, stream_id=stream_id, duplicate=stream_id is None)


models = APIRouter(prefix="/v1", tags=["models"])
Version = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")]  # a directory name, never ".."


@models.get("/models", response_model=ModelsResponse)
def list_models(store: StoreDep, estimator: EstimatorDep) -> ModelsResponse:
    try:
        versions, active, last = store.versions(), store.active_version(), store.get_json("retrain:last")
    except REDIS_ERRORS:
        raise redis_unavailable("model registry") from None
    items = [ModelVersion(version=v, digest=str(info.get("digest", "")), created_at=info.get("created_at"),
                          metrics=info.get("metrics") or {}, active=v == active)
             for v, info in sorted(versions.items(), key=lambda kv: str(kv[1].get("created_at", "")))]
    return ModelsResponse(active=active, serving=estimator.version, versions=items, last_retrain=last)


@models.post("/models:retrain", response_model=RetrainAccepted, status_code=status.HTTP_202_ACCEPTED,
             dependencies=[AdminDep])
def retrain_models(request: Request, settings: SettingsDep, store: StoreDep,
                   body: RetrainRequest | None = None) -> RetrainAccepted:
    """Start a retraining job in the background; its report appears in ``GET /v1/models``."""
    from tempo.estimator.retrain import retrain

    body = body or RetrainRequest()
    state = request.app.state
    with state.retrain_lock:
        job = state.retrain_thread
        if job is not None and job.is_alive():
            raise HTTPException(status.HTTP_409_CONFLICT, "a retraining job is already running")

        def run() -> None:
            job_store = Store(settings.redis_url, settings.key_prefix, settings.stream, timeout_s=10.0)
            try:
                retrain(job_store, settings, since=body.since, min_samples=body.min_samples)
            except (TempoError, *REDIS_ERRORS) as exc:
                log.warning("retraining did not run: %s", exc)
            except Exception:
                log.exception("retraining failed")
            finally:
                job_store.close()

        state.retrain_thread = threading.Thread(target=run, name="tempo-retrain", daemon=True)
        state.retrain_thread.start()
    return RetrainAccepted(status="started")


@models.post("/models/{version}:activate", response_model=ActivateResponse, dependencies=[AdminDep])
def activate_model(version: Version, store: StoreDep, estimator: EstimatorDep, settings: SettingsDep,
                   metrics: MetricsDep) -> ActivateResponse:
    """Verify the artifact (checksums, registry digest), point the registry at it, serve it."""
    try:
        info = store.version_info(version)
        if info is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"unknown model version {version!r}")
        try:
            served = ServedModel.load(settings.artifacts_dir / version, info.get("digest"))
        except (ArtifactError, OSError, ValueError) as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, f"model {version} cannot be served: {exc}") from None
        previous = store.activate(version)
    except UnknownVersion as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    except REDIS_ERRORS:
        raise redis_unavailable("model registry") from None
    if estimator.version != version:
        estimator.swap(served)
        metrics.set_model(version)
    return ActivateResponse(active=version, previous=previous)


ops = APIRouter(tags=["operations"])


@ops.get("/healthz", response_model=Health)
def healthz(store: StoreDep, estimator: EstimatorDep) -> Health:
    redis_ok = store.ping()
    return Health(status="ok" if redis_ok else "degraded", redis=redis_ok, model_version=estimator.version,
                  online_updates=estimator.learner.n_applied_)


@ops.get("/metrics", response_class=Response)
def metrics_endpoint(metrics: MetricsDep) -> Response:
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


# -- app ---------------------------------------------------------------------------------------------
class BodyLimit:
    """Refuses request bodies over ``limit`` bytes with 413 (by Content-Length, or while streaming)."""

    def __init__(self, app: Callable[..., Awaitable[None]], limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await _too_large(send, self.limit)
            return
        if length is None and scope.get("method") in ("POST", "PUT", "PATCH"):
            chunks, total = [], 0
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    break
                chunks.append(message.get("body", b""))
                total += len(chunks[-1])
                if total > self.limit:
                    await _too_large(send, self.limit)
                    return
                if not message.get("more_body"):
                    break
            body = b"".join(chunks)
            sent = False

            async def replay() -> Message:
                nonlocal sent
                if sent:
                    return await receive()
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}

            await self.app(scope, replay, send)
            return
        await self.app(scope, receive, send)


async def _too_large(send: Callable[[Message], Awaitable[None]], limit: int) -> None:
    body = f'{{"detail":"request body too large (limit {limit} bytes)"}}'.encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _clean(value: object) -> str:
    """Text safe to encode as UTF-8 (keys of a dict may be lone surrogates), at most 200 characters."""
    return str(value)[:200].encode("utf-8", "backslashreplace").decode("utf-8")


BACKGROUND_TIMEOUT_S = 5.0


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = Store(settings.redis_url, settings.key_prefix, settings.stream, settings.redis_timeout_s,
                      settings.stream_maxlen, settings.dedupe_ttl_s)
        metrics = app.state.metrics
        estimator = Estimator(settings.quantile, fallback=FallbackBounds(
            settings.quantile, settings.fallback_window, settings.fallback_default),
            graphs=bootstrap_store(settings.quantile) if settings.graph_bootstrap else None,
            job_done_s=settings.job_done_s)
        # the background loops get their own connection with a longer socket timeout: the short one keeps a
        # dead Redis from stalling a request, but on a busy machine it also cut the learner's blocking reads
        # short, and each cut made it re-sync from the committed state
        background_store = Store(settings.redis_url, settings.key_prefix, settings.stream,
                                 max(BACKGROUND_TIMEOUT_S, settings.redis_timeout_s), settings.stream_maxlen,
                                 settings.dedupe_ttl_s)
        watcher = RegistryWatcher(background_store, estimator, settings.artifacts_dir, on_swap=metrics.set_model)
        metrics.set_model(None)
        try:
            watcher.poll()
            seed = [r for _, r in store.recent(settings.fallback_window) if r]
            for record in reversed(seed):
                if isinstance(record.get("output_tokens"), int) and isinstance(record.get("slo_class"), str):
                    estimator.fallback.observe(record["slo_class"], record["output_tokens"])
            metrics.redis_up.set(1)
        except REDIS_ERRORS as exc:
            log.warning("redis unavailable at startup (%s): serving fallback bounds until it is back", exc)
            metrics.redis_up.set(0)
        worker = (OnlineWorker(background_store, estimator, settings, on_applied=metrics.applied)
                  if settings.run_worker else None)
        background = Background(worker, watcher, settings.registry_poll_s, on_redis=metrics.redis_up.set)
        app.state.settings, app.state.store, app.state.estimator = settings, store, estimator
        app.state.background, app.state.worker = background, worker
        app.state.batcher = MicroBatcher(estimator.estimate, settings.micro_batch)
        app.state.retrain_lock, app.state.retrain_thread = threading.Lock(), None
        background.start()
        try:
            yield
        finally:
            background.stop()
            store.close()
            background_store.close()

    app = FastAPI(title="Tempo length estimator", version="1", lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = metrics = Metrics()
    for router in (estimates, completions, models, ops):
        app.include_router(router)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        """422 with where and what, without echoing the input (it may be huge or not encodable)."""
        detail = [{"loc": [_clean(p) for p in e.get("loc", ())], "msg": _clean(e.get("msg", "invalid")),
                   "type": _clean(e.get("type", "value_error"))} for e in exc.errors()[:20]]
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(TempoError)
    async def tempo_error(request: Request, exc: TempoError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=status.HTTP_400_BAD_REQUEST)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"detail": "internal error"}, status_code=status.HTTP_500_INTERNAL_SERVER_ERROR)

    # metrics see every request, body limit first
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)
    return app
