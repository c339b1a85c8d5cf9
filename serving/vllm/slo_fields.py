"""The SLO fields of ``tempo serve``'s OpenAI endpoint, validated once, and how they travel to the engine.

A client names its objective in the OpenAI body's ``vllm_xargs`` (vLLM copies it into
``SamplingParams.extra_args``, which the engine core's scheduler reads):

    "vllm_xargs": {"slo_class": "deadline", "deadline_s": 30, "app": "code/Mbpp"}

with exactly these names: ``slo_class`` (latency | deadline | compound | best_effort), ``ttft_slo_s``,
``tbt_slo_s``, ``deadline_s``, ``job_id``, ``stage``, ``job_deadline_s`` (from the arrival of the job's first
call), ``app``; or, for latency requests, the llm-d headers ``x-slo-ttft-ms`` / ``x-slo-tpot-ms``. A request
with none gets the configured default class; a field the class does not use is refused (a typo should not
pass silently).

The front end adds what only it knows, under reserved ``tempo_*`` keys a client may not send: the length
ladder from the estimator (flattened ``[k0, b0, k1, b1, ...]``; ``vllm_xargs`` holds only scalars and flat
lists), its quantile, whether it was a fallback, and the prompt's hashed sketch for the completion record.
Pydantic and the standard library only: the API server and the engine core both import it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from tempo.scheduler.bounds import BoundLadder
from tempo.scheduler.slo import DEFAULT_DEADLINE_S, DEFAULT_TBT_S, DEFAULT_TTFT_S, SLO, SLOClass

SLO_FIELDS = ("slo_class", "ttft_slo_s", "tbt_slo_s", "deadline_s", "job_id", "stage", "job_deadline_s", "app")
RESERVED_PREFIX = "tempo_"
TTFT_HEADER, TPOT_HEADER = "x-slo-ttft-ms", "x-slo-tpot-ms"
MAX_SLO_S = 7 * 24 * 3600.0  # a week: anything longer is a unit mistake (milliseconds sent as seconds)
MIN_SLO_S = 1e-3  # a millisecond: anything shorter is a mistake, and a denormal TBT overflows the scheduler's sums

# keys the front end writes for the engine
LADDER_KEY = "tempo_ladder"
QUANTILE_KEY = "tempo_quantile"
FALLBACK_KEY = "tempo_bound_fallback"
SKETCH_KEY = "tempo_sketch"
ESTIMATE_PROMPT_TOKENS_KEY = "tempo_estimate_prompt_tokens"  # the prompt length the ladder was asked for


class SLOFieldError(ValueError):
    """A bad SLO field; the message is one line meant for the client (400)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


Seconds = Annotated[float, Field(ge=MIN_SLO_S, le=MAX_SLO_S), AfterValidator(_finite)]
Name = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[\x21-\x7e]+$")]


class SLOFields(BaseModel):
    """The client's SLO fields (``vllm_xargs``); unknown non-reserved keys are left to vLLM."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    slo_class: Literal["latency", "deadline", "compound", "best_effort"] | None = None
    ttft_slo_s: Seconds | None = None
    tbt_slo_s: Seconds | None = None
    deadline_s: Seconds | None = None
    job_id: Name | None = None
    stage: Annotated[int, Field(ge=0, le=100_000)] | None = None
    job_deadline_s: Seconds | None = None
    app: Name | None = None


@dataclass(frozen=True)
class SLODefaults:
    """What a request gets for fields it leaves out (``tempo serve`` options)."""

    slo_class: SLOClass = SLOClass.LATENCY
    ttft_s: float = DEFAULT_TTFT_S
    tbt_s: float = DEFAULT_TBT_S
    deadline_s: float = DEFAULT_DEADLINE_S
    job_deadline_s: float = DEFAULT_DEADLINE_S  # per job, when a compound call names none
    app: str = "default"


@dataclass(frozen=True)
class RequestSLO:
    """A request's objective as the engine uses it, with every default applied."""

    slo: SLO
    app: str
    job_id: str | None = None
    stage: int | None = None

    def to_xargs(self) -> dict[str, str | int | float]:
        """The normalised fields, written back into ``vllm_xargs`` for the engine."""
        slo = self.slo
        out: dict[str, str | int | float] = {"slo_class": slo.slo_class.value, "app": self.app}
        for key, value in (("ttft_slo_s", slo.ttft_s), ("tbt_slo_s", slo.tbt_s), ("deadline_s", slo.deadline_s),
                           ("job_deadline_s", slo.job_deadline_s), ("job_id", self.job_id), ("stage", self.stage)):
            if value is not None:
                out[key] = value
        return out


def _header_ms(headers: Mapping[str, str], name: str) -> float | None:
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise SLOFieldError(f"header {name} must be a number of milliseconds, got {raw[:40]!r}", name) from None
    if not math.isfinite(value) or not MIN_SLO_S * 1000 <= value <= MAX_SLO_S * 1000:
        raise SLOFieldError(f"header {name} must be a number of milliseconds from {MIN_SLO_S * 1000:g} to "
                            f"{MAX_SLO_S * 1000:g}, got {raw[:40]!r}", name)
    return value / 1000.0


def parse_request_slo(xargs: Mapping[str, Any] | None, headers: Mapping[str, str], defaults: SLODefaults,
                      allow_reserved: bool = False) -> RequestSLO:
    """The objective a client asked for (``vllm_xargs`` + llm-d headers, lower-case names), or SLOFieldError.

    ``allow_reserved``: the engine side, which reads what the front end wrote; clients may not send
    ``tempo_*`` keys.
    """
    xargs = dict(xargs or {})
    if not allow_reserved:
        reserved = sorted(k for k in xargs if str(k).startswith(RESERVED_PREFIX))
        if reserved:
            key = reserved[0]
            raise SLOFieldError(f"vllm_xargs key {key!r} is reserved for the server", f"vllm_xargs.{key}")
    try:
        fields = SLOFields.model_validate({k: v for k, v in xargs.items() if k in SLO_FIELDS})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise SLOFieldError(f"vllm_xargs.{where}: {first['msg']}", f"vllm_xargs.{where}") from None
    ttft_h, tpot_h = _header_ms(headers, TTFT_HEADER), _header_ms(headers, TPOT_HEADER)
    cls_name = fields.slo_class
    if (ttft_h is not None or tpot_h is not None) and cls_name not in (None, "latency"):
        raise SLOFieldError(f"{TTFT_HEADER} / {TPOT_HEADER} apply to latency requests, not {cls_name}", TTFT_HEADER)
    if cls_name is None:
        given = {k for k in SLO_FIELDS if getattr(fields, k) is not None} - {"app"}
        if ttft_h is not None or tpot_h is not None or given & {"ttft_slo_s", "tbt_slo_s"}:
            cls_name = "latency"
        elif "deadline_s" in given:
            cls_name = "deadline"
        elif given & {"job_id", "stage", "job_deadline_s"}:
            cls_name = "compound"
        else:
            cls_name = defaults.slo_class.value
    slo_class = SLOClass(cls_name)
    allowed = {
        SLOClass.LATENCY: {"ttft_slo_s", "tbt_slo_s"},
        SLOClass.DEADLINE: {"deadline_s"},
        SLOClass.COMPOUND: {"job_id", "stage", "job_deadline_s"},
        SLOClass.BEST_EFFORT: set(),
    }[slo_class]
    for name in ("ttft_slo_s", "tbt_slo_s", "deadline_s", "job_id", "stage", "job_deadline_s"):
        if getattr(fields, name) is not None and name not in allowed:
            raise SLOFieldError(f"vllm_xargs.{name} does not apply to a {slo_class.value} request",
                                f"vllm_xargs.{name}")
    app = fields.app or defaults.app
    if slo_class is SLOClass.LATENCY:
        ttft = ttft_h if ttft_h is not None else fields.ttft_slo_s
        tbt = tpot_h if tpot_h is not None else fields.tbt_slo_s
        return RequestSLO(SLO.latency(ttft or defaults.ttft_s, tbt or defaults.tbt_s), app)
    if slo_class is SLOClass.DEADLINE:
        return RequestSLO(SLO.deadline(fields.deadline_s or defaults.deadline_s), app)
    if slo_class is SLOClass.COMPOUND:
        if fields.job_id is None:
            raise SLOFieldError("a compound request needs vllm_xargs.job_id", "vllm_xargs.job_id")
        return RequestSLO(SLO.compound(fields.job_deadline_s or defaults.job_deadline_s), app, fields.job_id,
                          fields.stage or 0)
    return RequestSLO(SLO.best_effort(), app)


def ladder_to_xargs(ladder: BoundLadder) -> dict[str, Any]:
    return {LADDER_KEY: [v for step in ladder.steps for v in step], QUANTILE_KEY: ladder.quantile,
            FALLBACK_KEY: int(ladder.fallback)}


def ladder_from_xargs(xargs: Mapping[str, Any]) -> BoundLadder | None:
    """The front end's ladder, or None when there is none or it is malformed (the engine then falls back)."""
    flat = xargs.get(LADDER_KEY)
    if not isinstance(flat, list) or not flat or len(flat) % 2:
        return None
    try:
        steps = tuple((int(flat[i]), int(flat[i + 1])) for i in range(0, len(flat), 2))
        return BoundLadder(steps, float(xargs.get(QUANTILE_KEY, 0.9)), bool(xargs.get(FALLBACK_KEY, 0)))
    except (TypeError, ValueError):
        return None
