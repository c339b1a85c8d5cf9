"""Job-level admission at the front end: refuse a compound job, never one call of a job already admitted.

A compound job is many dependent calls under one deadline. Refusing its third call at the door wastes
the two already served and fails the job anyway, so under overload the front end keeps ``reserve`` of
its ``max_in_flight`` slots for calls of jobs it has admitted: new work (requests outside a job and the
first call of a new job) is admitted while fewer than ``max_in_flight - reserve`` requests are in
flight, calls of admitted jobs while fewer than ``max_in_flight``. A job whose call is refused all the
same is dropped whole: its later calls are refused at once (reason ``job-dropped``) instead of being
served for nothing. Jobs are remembered for ``ttl_s`` after their last call, at most ``max_jobs`` of them
(the oldest forgotten first), so memory stays bounded.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

QUEUE_FULL, JOB_DROPPED = "queue-full", "job-dropped"


class JobAdmission:
    """``decide(job_id, in_flight)``: None to admit, else the refusal's reason."""

    def __init__(self, max_in_flight: int, reserve: int, ttl_s: float = 600.0, max_jobs: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not 0 <= reserve < max_in_flight:
            raise ValueError("the job reserve must be in [0, max_in_flight)")
        self.max_in_flight = max_in_flight
        self.open_limit = max_in_flight - reserve
        self.ttl_s, self.max_jobs, self.clock = ttl_s, max_jobs, clock
        # job id -> (admitted: False when dropped, time of its last call), oldest call first
        self._jobs: OrderedDict[str, tuple[bool, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._jobs)

    def decide(self, job_id: str | None, in_flight: int) -> str | None:
        """``in_flight``: requests admitted and not yet answered, this one not counted."""
        if job_id is None:
            return None if in_flight < self.open_limit else QUEUE_FULL
        now = self.clock()
        self._forget(now)
        known = self._jobs.pop(job_id, None)
        if known is None:
            reason = None if in_flight < self.open_limit else QUEUE_FULL
        elif known[0]:
            reason = None if in_flight < self.max_in_flight else QUEUE_FULL
        else:
            reason = JOB_DROPPED
        self._jobs[job_id] = (reason is None, now)  # a refused call drops its job
        return reason

    def _forget(self, now: float) -> None:
        while self._jobs:
            oldest, (_, last_s) = next(iter(self._jobs.items()))
            if len(self._jobs) < self.max_jobs and now - last_s < self.ttl_s:
                return
            del self._jobs[oldest]
