"""Request and response bodies of the estimator REST API (DESIGN section 3), with hard limits.

Every string is bounded and must be encodable as UTF-8 (JSON can carry lone surrogates); every number is
bounded and finite, so anything the validator lets through can be served without a 5xx.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

MAX_PROMPT_CHARS = 200_000
MAX_NAME_CHARS = 200
MAX_TOKENS = 10_000_000
MAX_BATCH = 1024
MAX_STAGES = 256  # a compound job's stages (an estimate request's history)
MAX_FANOUT = 1024  # calls in one stage
MAX_SKETCH_ENTRIES = 1 << 15

SLOClassName = Literal["latency", "deadline", "compound", "best_effort"]


def _utf8(value: str | None) -> str | None:
    if value is not None:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("text must be valid Unicode (no lone surrogates)") from None
    return value


def _finite(value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS), AfterValidator(_utf8)]
Prompt = Annotated[str, Field(max_length=MAX_PROMPT_CHARS), AfterValidator(_utf8)]
Tokens = Annotated[int, Field(ge=0, le=MAX_TOKENS)]
PositiveTokens = Annotated[int, Field(ge=1, le=MAX_TOKENS)]
Seconds = Annotated[float, Field(ge=0, le=1e12), AfterValidator(_finite)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EstimateRequest(_Strict):
    prompt: Prompt | None = Field(None, description="prompt text (hashed, never stored)")
    prompt_tokens: int | None = Field(None, ge=0, le=MAX_TOKENS)
    slo_class: SLOClassName
    app: Name | None = None
    model: Name | None = Field(None, description="served model whose lengths to bound")
    quantile: float | None = Field(None, gt=0, lt=1, description="must equal the served quantile")
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS, description="bounds are capped at this")

    @model_validator(mode="after")
    def _prompt_or_tokens(self) -> EstimateRequest:
        if self.prompt is None and self.prompt_tokens is None:
            raise ValueError("give prompt or prompt_tokens")
        return self


class EstimateResponse(BaseModel):
    upper_bound: int
    quantile: float
    ladder: list[tuple[int, int]]
    model_version: str | None
    fallback: bool
    source: Literal["batch", "river", "fallback"]


class BatchEstimateRequest(_Strict):
    requests: list[EstimateRequest] = Field(min_length=1, max_length=MAX_BATCH)


class BatchEstimateResponse(BaseModel):
    estimates: list[EstimateResponse]


class RefineRequest(_Strict):
    request: EstimateRequest
    generated: int = Field(ge=0, le=MAX_TOKENS, description="tokens generated so far")
    ladder: list[tuple[Tokens, PositiveTokens]] | None = Field(
        None, max_length=64, description="the ladder given earlier; recomputed when absent")


class RefineResponse(BaseModel):
    upper_bound: int
    remaining: int
    generated: int
    quantile: float
    model_version: str | None
    fallback: bool


class Sketch(_Strict):
    indices: list[Annotated[int, Field(ge=0, lt=MAX_SKETCH_ENTRIES)]] = Field(max_length=MAX_SKETCH_ENTRIES)
    weights: list[Annotated[float, Field(ge=-100, le=100), AfterValidator(_finite)]] = Field(
        max_length=MAX_SKETCH_ENTRIES)
    n_chars: int = Field(ge=0, le=MAX_TOKENS * 10)
    n_words: int = Field(ge=0, le=MAX_TOKENS * 10)
    n_newlines: int = Field(ge=0, le=MAX_TOKENS * 10)

    @model_validator(mode="after")
    def _same_length(self) -> Sketch:
        if len(self.indices) != len(self.weights):
            raise ValueError("sketch indices and weights differ in length")
        return self


class CompletionRecord(_Strict):
    """A finished request (DESIGN section 3); written once per request id."""

    request_id: Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[\x21-\x7e]+$")]
    model: Name | None = None
    app: Name | None = None
    slo_class: SLOClassName
    prompt_tokens: int = Field(ge=0, le=MAX_TOKENS)
    estimate_prompt_tokens: int | None = Field(
        None, ge=0, le=MAX_TOKENS, description="the prompt length the bound was estimated for (serving's guess "
        "from the text, when the engine's count includes a chat template): learned with instead of prompt_tokens")
    prompt: Prompt | None = Field(None, description="hashed into a sketch; kept only when configured")
    sketch: Sketch | None = Field(None, description="the prompt's hashed sketch, when serving computed it")
    output_tokens: int = Field(ge=1, le=MAX_TOKENS)
    arrival_s: Seconds | None = None
    first_token_s: Seconds | None = None
    finish_s: Seconds | None = None
    bound: int | None = Field(None, ge=1, le=MAX_TOKENS, description="the initial bound that was used")
    slo_met: bool | None = None
    finish_reason: Literal["stop", "length", "abort", "rejected", "error", "repetition"] | None = Field(
        None, description="why it ended; only stop / length records are learned from (others are censored)")
    job_id: Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[\x21-\x7e]+$")] | None = Field(
        None, description="compound call: its job (the job's graph is learned once the job goes quiet)")
    stage: int | None = Field(None, ge=0, le=MAX_STAGES - 1, description="compound call: its stage, from 0")


Call = tuple[Tokens, PositiveTokens]  # (prompt tokens, output tokens) of one finished call


class JobEstimateRequest(_Strict):
    """A compound job so far: its finished stages and the prompts of the stage being run."""

    app: Name = Field(description="the job's app (graphs are matched within an app)")
    stage: int = Field(ge=0, le=MAX_STAGES - 1, description="the stage being run, from 0")
    history: list[Annotated[list[Call], Field(min_length=1, max_length=MAX_FANOUT)]] = Field(
        default_factory=list, max_length=MAX_STAGES, description="the finished stages: each call's [prompt, output]")
    stage_prompts: list[Tokens] = Field(default_factory=list, max_length=MAX_FANOUT,
                                        description="prompt tokens of the current stage's calls")
    job_deadline_s: Seconds | None = Field(None, description="the job's deadline (from its arrival): the answer "
                                           "then gives the current stage's sub-deadline in seconds")

    @model_validator(mode="after")
    def _history_is_the_stages_before(self) -> JobEstimateRequest:
        if len(self.history) != self.stage:
            raise ValueError(f"history must hold the {self.stage} finished stage(s) before stage {self.stage}, "
                             f"got {len(self.history)}")
        return self


class JobEstimateResponse(BaseModel):
    """What remains after the current stage: bounds at the served quantile on the critical path (the
    longest call of each later stage), means of the totals, and the stage's sub-deadline."""

    stages_after: int
    decode_tokens_after: int
    prefill_tokens_after: int
    tokens_after: float
    decode_total_after: float
    prefill_total_after: float
    median: dict[str, float] = Field(description="weighted median of the matched jobs (a point estimate)")
    sub_deadline_fraction: float | None = Field(description="phi(s): fraction of the job deadline by which this "
                                                "stage should be done")
    stage_deadline_s: float | None = Field(description="phi(s) x job_deadline_s, when the deadline was given")
    matched_jobs: float = Field(description="effective number of past jobs behind the answer")
    fallback: bool = Field(description="too few matches: the app's per-stage quantiles answered")
    quantile: float


class CompletionAccepted(BaseModel):
    request_id: str
    stream_id: str | None
    duplicate: bool


class ModelVersion(BaseModel):
    version: str
    digest: str
    created_at: str | None = None
    metrics: dict[str, object] = {}
    active: bool


class ModelsResponse(BaseModel):
    active: str | None
    serving: str | None
    versions: list[ModelVersion]
    last_retrain: dict[str, object] | None = None


class RetrainRequest(_Strict):
    since: Annotated[str, Field(max_length=64, pattern=r"^[0-9]+(-[0-9]+)?$")] | None = None
    min_samples: int = Field(1000, ge=10, le=10_000_000)


class RetrainAccepted(BaseModel):
    status: Literal["started"]


class ActivateResponse(BaseModel):
    active: str
    previous: str | None


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    redis: bool
    model_version: str | None
    online_updates: int
