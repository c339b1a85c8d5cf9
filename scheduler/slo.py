"""Request classes and their service-level objectives (DESIGN section 1).

An SLO is a small frozen value: the policy, the simulator, the vLLM plug-in and the goodput
accounting all read the same object, so "what counts as on time" is defined once, here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

DEFAULT_TTFT_S = 2.0
DEFAULT_TBT_S = 0.1
DEFAULT_DEADLINE_S = 20.0
DEFAULT_STAGE_DEADLINE_S = 20.0  # a compound job's deadline is this times its number of stages


class SLOClass(StrEnum):
    """The four request classes; the value is the wire name (JSON, CLI, vLLM extra_args)."""

    LATENCY = "latency"  # streaming chat: TTFT and a per-token pace
    DEADLINE = "deadline"  # tool call / API job: the whole answer by a deadline
    COMPOUND = "compound"  # one call of an agentic job: the whole job by the job deadline
    BEST_EFFORT = "best_effort"  # no SLO, takes what is left

    @classmethod
    def parse(cls, name: str) -> SLOClass:
        """The class named ``name``; ValueError listing the known names otherwise."""
        try:
            return cls(name.strip().lower())
        except ValueError:
            known = ", ".join(c.value for c in cls)
            raise ValueError(f"unknown SLO class {name!r} (known: {known})") from None


@dataclass(frozen=True, slots=True)
class SLO:
    """A request's objective. Times are seconds; relative ones count from the request's (job's) arrival.

    Only the fields of ``slo_class`` are set; use the class constructors (``SLO.latency()`` ...).
    """

    slo_class: SLOClass
    ttft_s: float | None = None  # latency: first token within this of arrival
    tbt_s: float | None = None  # latency: token i due by arrival + ttft + i * tbt (cumulative)
    deadline_s: float | None = None  # deadline: whole response within this of arrival
    job_deadline_s: float | None = None  # compound: the job's last call done within this of job arrival

    def __post_init__(self) -> None:
        required = {
            SLOClass.LATENCY: ("ttft_s", "tbt_s"),
            SLOClass.DEADLINE: ("deadline_s",),
            SLOClass.COMPOUND: ("job_deadline_s",),
            SLOClass.BEST_EFFORT: (),
        }[self.slo_class]
        for name in ("ttft_s", "tbt_s", "deadline_s", "job_deadline_s"):
            value = getattr(self, name)
            if name in required:
                if value is None or not value > 0:
                    raise ValueError(f"{self.slo_class.value} SLO needs {name} > 0, got {value!r}")
            elif value is not None:
                raise ValueError(f"{name} does not apply to a {self.slo_class.value} SLO")

    @classmethod
    def latency(cls, ttft_s: float = DEFAULT_TTFT_S, tbt_s: float = DEFAULT_TBT_S) -> SLO:
        return cls(SLOClass.LATENCY, ttft_s=ttft_s, tbt_s=tbt_s)

    @classmethod
    def deadline(cls, deadline_s: float = DEFAULT_DEADLINE_S) -> SLO:
        return cls(SLOClass.DEADLINE, deadline_s=deadline_s)

    @classmethod
    def compound(cls, job_deadline_s: float) -> SLO:
        return cls(SLOClass.COMPOUND, job_deadline_s=job_deadline_s)

    @classmethod
    def best_effort(cls) -> SLO:
        return cls(SLOClass.BEST_EFFORT)

    def scaled(self, factor: float) -> SLO:
        """The same objective with every time multiplied by ``factor`` (SLO tiers x1..x4)."""
        if not factor > 0:
            raise ValueError(f"SLO scale factor must be > 0, got {factor}")

        def mul(value: float | None) -> float | None:
            return None if value is None else value * factor

        return replace(
            self,
            ttft_s=mul(self.ttft_s),
            tbt_s=mul(self.tbt_s),
            deadline_s=mul(self.deadline_s),
            job_deadline_s=mul(self.job_deadline_s),
        )

    def token_due_s(self, arrival_s: float, index: int) -> float:
        """Latency class: absolute time by which output token ``index`` (0-based) must be emitted."""
        if self.ttft_s is None or self.tbt_s is None:
            raise ValueError(f"token_due_s applies to latency SLOs, not {self.slo_class.value}")
        return arrival_s + self.ttft_s + index * self.tbt_s
