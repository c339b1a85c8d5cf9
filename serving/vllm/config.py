"""``tempo serve``'s configuration, handed to vLLM's processes in one environment variable.

vLLM builds the scheduler (``scheduler_cls``) in its engine-core process and the middleware in its API
server process, both without arguments; the environment is what reaches both. ``tempo serve`` writes
``TEMPO_SERVE_CONFIG`` (this model as JSON), the two sides read it with ``ServeConfig.from_env()``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from tempo.estimator.retention import DEDUPE_TTL_S, STREAM_MAXLEN
from tempo.scheduler.slo import DEFAULT_DEADLINE_S, DEFAULT_TBT_S, DEFAULT_TTFT_S, SLOClass
from tempo.serving.vllm.slo_fields import SLODefaults

from tempo.errors import TempoError

ENV_VAR = "TEMPO_SERVE_CONFIG"
Positive = Annotated[float, Field(gt=0)]


class ServeConfig(BaseModel):
    """Everything Tempo's parts inside vLLM need to know (defaults: what ``tempo serve`` uses)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # scheduling (engine core)
    policy: str = "tempo"  # a registered policy (tempo.scheduler.registry)
    policy_params: dict[str, str] = Field(default_factory=dict)
    step_slots: int | None = Field(None, ge=1)  # requests per step the policy may plan (None: max_num_seqs)
    profile: str = "cpu-tiny-llama"  # engine profile the step-time model starts from (then fitted online)
    job_ttl_s: Positive = 3600.0  # a compound job with no live call is forgotten after this

    # SLO defaults (front end and engine)
    default_slo_class: SLOClass = SLOClass.LATENCY
    default_ttft_s: Positive = DEFAULT_TTFT_S
    default_tbt_s: Positive = DEFAULT_TBT_S
    default_deadline_s: Positive = DEFAULT_DEADLINE_S
    default_job_deadline_s: Positive = DEFAULT_DEADLINE_S
    default_app: str = "default"

    # length bounds (front end)
    estimator_url: str | None = None  # the estimator service; None: local bounds only
    estimator_timeout_s: Positive = 0.05  # serving never waits longer on the estimator
    estimator_model: str | None = None  # the served model's name in the estimator (None: served_model)
    quantile: float = Field(0.9, gt=0, lt=1)
    local_bounds: Literal["empirical", "fixed"] = "empirical"  # fallback (and source without a service)
    bounds_model: str = "meta-llama--Llama-3.1-8B-Instruct"  # CASTILLO lengths the local bounds start from

    # overload and input limits (front end)
    max_in_flight: int = Field(1024, ge=1)  # requests admitted and not yet answered; beyond: 503 at once
    job_reserve: float = Field(0.25, ge=0, lt=1)  # share of max_in_flight only calls of admitted jobs may use
    max_body_bytes: int = Field(4 << 20, ge=1024)
    max_prompt_chars: int = Field(200_000, ge=1)
    freeze_gc: bool = True  # freeze the API server's start-up heap: full collections stop its loop (gc_pauses)

    # completion records (engine core)
    served_model: str = "default"  # the model name completion records carry
    redis_url: str | None = None  # None: records are not written (metrics still count them)
    stream: str = "tempo:completions"
    stream_maxlen: int = Field(STREAM_MAXLEN, ge=1000)  # records the stream keeps (approximate trim)
    dedupe_ttl_s: int = Field(DEDUPE_TTL_S, ge=60)  # a request id is recorded once within this window
    key_prefix: str = "tempo"
    store_prompt_text: bool = False
    record_buffer: int = Field(100_000, ge=1)  # records held while Redis is down
    spill_path: str | None = ".cache/tempo-serve/unsent-completions.jsonl"  # records left at shutdown

    @property
    def job_reserve_slots(self) -> int:
        """In-flight slots only calls of admitted jobs may use; new work is admitted below the rest."""
        return int(self.max_in_flight * self.job_reserve)

    def slo_defaults(self) -> SLODefaults:
        return SLODefaults(self.default_slo_class, self.default_ttft_s, self.default_tbt_s, self.default_deadline_s,
                           self.default_job_deadline_s, self.default_app)

    def to_env(self) -> dict[str, str]:
        return {ENV_VAR: self.model_dump_json()}

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ServeConfig:
        raw = (os.environ if env is None else env).get(ENV_VAR)
        if not raw:
            return cls()
        try:
            return cls.model_validate_json(raw)
        except ValidationError as exc:
            raise TempoError(f"{ENV_VAR} is invalid: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}") from None

    @classmethod
    def build(cls, **values: Any) -> ServeConfig:
        """From CLI options (None: the default); TempoError naming the first bad one."""
        try:
            return cls(**{k: v for k, v in values.items() if v is not None})
        except ValidationError as exc:
            first = exc.errors()[0]
            raise TempoError(f"invalid option {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
