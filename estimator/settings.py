"""Service configuration: environment variables with the ``TEMPO_`` prefix (``TEMPO_REDIS_URL``, ...).

Read through ``get_settings()`` (cached); tests and ``create_app(settings)`` inject their own.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from tempo.estimator.retention import DEDUPE_TTL_S, STREAM_MAXLEN


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TEMPO_", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_timeout_s: float = Field(default=0.5, gt=0)  # socket timeout: a dead Redis must not stall a request
    key_prefix: str = "tempo"
    stream: str = "tempo:completions"
    stream_maxlen: int = Field(default=STREAM_MAXLEN, ge=1000)  # approximate trim of the stream (~2 KB a record)
    dedupe_ttl_s: int = Field(default=DEDUPE_TTL_S, ge=60)  # a request id is recorded once within this window
    store_prompt_text: bool = False  # completion records keep the hashed sketch; the text only when True
    artifacts_dir: Path = Path("artifacts")
    admin_token: SecretStr | None = None  # admin endpoints answer 403 while unset
    quantile: float = Field(default=0.9, gt=0, lt=1)  # served when there is no model (fallback and River)
    max_batch: int = Field(default=1024, ge=1)
    micro_batch: int = Field(default=16, ge=1)  # concurrent single estimates computed in one model call
    run_worker: bool = True  # the online learner and registry watcher run inside the API process
    consumer: str = "online-1"  # consumer name in the online group (one learner per service)
    worker_batch: int = Field(default=256, ge=1)
    worker_block_ms: int = Field(default=200, ge=1)
    checkpoint_every: int = Field(default=512, ge=1)  # records applied before state + acks are committed
    checkpoint_interval_s: float = Field(default=1.0, gt=0)
    claim_idle_ms: int = Field(default=30_000, ge=0)  # pending entries idle this long are claimed on restart
    registry_poll_s: float = Field(default=1.0, gt=0)
    fallback_window: int = Field(default=2000, ge=10)  # recent completions per class behind the fallback bound
    fallback_default: int = Field(default=1024, ge=1)  # fallback bound before any completion is seen
    apply_delay_s: float = Field(default=0.0, ge=0)  # sleep per applied record: fault-injection tests only
    job_done_s: float = Field(default=120.0, gt=0)  # a compound job with no call for this long is learned
    graph_bootstrap: bool = True  # start the graph store from the vendored deep-research jobs (training half)

    @model_validator(mode="after")
    def _blocking_read_fits_the_socket_timeout(self) -> Settings:
        if self.worker_block_ms / 1000 >= self.redis_timeout_s:
            raise ValueError("worker_block_ms must be shorter than redis_timeout_s (a blocking read would time out)")
        return self


@lru_cache
def get_settings() -> Settings:
    return Settings()
