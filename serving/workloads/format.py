"""The workload file: JSONL, one request per line, validated on read.

A compound job is one line per call: every call carries the job's arrival time in ``arrival_s``; calls
of stage s > 0 list the ids they depend on and are released by the engine when those finish. The true
``output_tokens`` is for the engine only (it forces the real length); policies see bounds.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Annotated, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from tempo.scheduler.slo import SLO, SLOClass

from tempo.errors import TempoError

PositiveSeconds = Annotated[float, Field(gt=0)]


class WorkloadRequest(BaseModel):
    """One request (or one call of a compound job) of a workload."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1)
    arrival_s: float = Field(ge=0, description="seconds from the workload start; compound: the job's arrival")
    slo_class: SLOClass
    ttft_slo_s: PositiveSeconds | None = None
    tbt_slo_s: PositiveSeconds | None = None
    deadline_s: PositiveSeconds | None = Field(None, description="deadline class, relative to arrival")
    job_deadline_s: PositiveSeconds | None = Field(None, description="compound, relative to the job arrival")
    slo_tier: int = Field(1, ge=1, description="the SLO scale factor the builder applied")
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    prompt_tokens: int = Field(ge=1)
    output_tokens: int = Field(ge=1, description="true response length; seen only by the engine")
    model: str | None = Field(None, description="the served model whose lengths these are")
    app: str = Field("default", description="source application, e.g. chat/Alpaca or deep_research")
    job_id: str | None = None
    stage: int | None = Field(None, ge=0)
    depends_on: list[str] = Field(default_factory=list)
    source: str | None = Field(None, description="provenance, e.g. castillo:Alpaca:<prompt_id>")

    @model_validator(mode="after")
    def _check_class_fields(self) -> Self:
        self.slo()  # raises ValueError naming the missing or extra SLO field
        compound = self.slo_class is SLOClass.COMPOUND
        if compound and (self.job_id is None or self.stage is None):
            raise ValueError("a compound call needs job_id and stage")
        if not compound and (self.job_id is not None or self.depends_on):
            raise ValueError("job_id and depends_on apply to compound calls only")
        if self.prompt_token_ids is not None and len(self.prompt_token_ids) != self.prompt_tokens:
            raise ValueError("prompt_token_ids length differs from prompt_tokens")
        return self

    def slo(self) -> SLO:
        """The request's objective as the scheduler and the accounting read it."""
        return SLO(
            self.slo_class,
            ttft_s=self.ttft_slo_s,
            tbt_s=self.tbt_slo_s,
            deadline_s=self.deadline_s,
            job_deadline_s=self.job_deadline_s,
        )


def write_workload(path: Path, requests: Iterable[WorkloadRequest]) -> int:
    """Write requests as JSONL (None fields left out); returns the number written."""
    count = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for request in requests:
            out.write(request.model_dump_json(exclude_none=True, exclude_defaults=False) + "\n")
            count += 1
    return count


def iter_workload(path: Path) -> Iterator[WorkloadRequest]:
    """Requests of a workload file; TempoError naming the line on the first bad one."""
    if not path.is_file():
        raise TempoError(f"workload file not found: {path}")
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                yield WorkloadRequest.model_validate(json.loads(line))
            except json.JSONDecodeError as exc:
                raise TempoError(f"{path}:{number}: not JSON: {exc.msg}") from None
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first["loc"]) or "request"
                raise TempoError(f"{path}:{number}: {where}: {first['msg']}") from None


def read_workload(path: Path) -> list[WorkloadRequest]:
    """All requests of a workload file, checked for unique ids and known dependencies."""
    requests = list(iter_workload(path))
    ids: set[str] = set()
    for request in requests:
        if request.id in ids:
            raise TempoError(f"{path}: duplicate request id {request.id!r}")
        ids.add(request.id)
    for request in requests:
        missing = [d for d in request.depends_on if d not in ids]
        if missing:
            raise TempoError(f"{path}: {request.id} depends on unknown ids {missing}")
    return requests
