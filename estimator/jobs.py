"""Finished compound jobs from completion records, for the pattern-graph store (issue #12).

A completion record of a compound call names its job and stage (``job_id``, ``stage``). Nothing says which
call is a job's last, so a job counts as finished once no call of it has ended for ``done_after_s``: its
next stage is released as soon as the one before ends (or after a tool's time), so a quiet job is done.
Quiet is judged on the records' own clock (their ``finish_s``, the latest seen): a backlog replayed after a
restart must not close a job whose later calls are still further down the stream. Once the stream is read
to its end, the worker judges on the wall clock. Only calls that completed (``stop`` / ``length``) enter
the graph; a job with a rejected or aborted call is dropped, since its later stages never ran and its graph
would teach the store a job shorter than it was.

The recorder's partial jobs are part of the online state the worker commits with its acknowledgements, so
a restart neither loses nor doubles a job.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from tempo.models.job_graphs import GraphStore
from tempo.scheduler.jobs import JobGraph

COMPLETED = ("stop", "length")
MAX_STAGE = 10_000


@dataclass
class _Partial:
    app: str
    last_s: float
    stages: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    broken: bool = False  # a call did not complete: the job is not learned


class JobRecorder:
    """``observe`` compound completion records; ``finished(now)`` hands back the jobs gone quiet."""

    def __init__(self, done_after_s: float = 120.0, max_pending: int = 10_000, default_app: str = "compound") -> None:
        if done_after_s <= 0 or max_pending < 1:
            raise ValueError("done_after_s must be > 0 and max_pending >= 1")
        self.done_after_s = done_after_s
        self.max_pending = max_pending
        self.default_app = default_app
        self._jobs: OrderedDict[str, _Partial] = OrderedDict()  # by last activity, oldest first
        self.dropped = 0  # jobs not learned (a call that did not complete, or evicted past max_pending)
        self.clock = 0.0  # the latest finish time seen (the stream's clock)

    def __len__(self) -> int:
        return len(self._jobs)

    def observe(self, record: dict[str, Any], now: float) -> bool:
        """Take one record; True when it was a compound call's (malformed job fields are ignored)."""
        job_id, stage = record.get("job_id"), record.get("stage", 0)
        if not isinstance(job_id, str) or not job_id or isinstance(stage, bool) or not isinstance(stage, int):
            return False
        if not 0 <= stage <= MAX_STAGE:
            return False
        finished_at = record.get("finish_s")
        last = float(finished_at) if isinstance(finished_at, int | float) and finished_at > 0 else now
        app = record.get("app") if isinstance(record.get("app"), str) else self.default_app
        job = self._jobs.get(job_id)
        if job is None:
            job = self._jobs[job_id] = _Partial(str(app), last)
        job.last_s = max(job.last_s, last)
        self.clock = max(self.clock, last)
        self._jobs.move_to_end(job_id)
        prompt, output = record.get("prompt_tokens"), record.get("output_tokens")
        if record.get("finish_reason", "stop") in COMPLETED and isinstance(prompt, int) and isinstance(output, int):
            job.stages.setdefault(stage, []).append((max(0, prompt), max(1, output)))
        else:
            job.broken = True
        while len(self._jobs) > self.max_pending:
            self._jobs.popitem(last=False)
            self.dropped += 1
        return True

    def finished(self, now: float | None = None) -> list[tuple[str, JobGraph]]:
        """``(app, graph)`` of every job quiet for ``done_after_s`` at ``now`` (default: the records' clock),
        removed from the recorder."""
        now = self.clock if now is None else now
        out: list[tuple[str, JobGraph]] = []
        while self._jobs:
            job_id, job = next(iter(self._jobs.items()))
            if now - job.last_s < self.done_after_s:
                break
            del self._jobs[job_id]
            stages = [job.stages[s] for s in sorted(job.stages)]
            if job.broken or not stages or sorted(job.stages) != list(range(len(stages))):
                self.dropped += 1  # a failed call, or a stage missing: not the job's whole graph
                continue
            out.append((job.app, stages))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"done_after_s": self.done_after_s, "dropped": self.dropped, "clock": self.clock,
                "jobs": [[job_id, j.app, j.last_s, j.broken, [[s, [list(c) for c in calls]]
                                                               for s, calls in sorted(j.stages.items())]]
                         for job_id, j in self._jobs.items()]}

    def restore(self, data: dict[str, Any]) -> None:
        """The partial jobs of a committed state (a malformed entry is skipped, never raised)."""
        self._jobs.clear()
        self.dropped = int(data.get("dropped", 0)) if isinstance(data.get("dropped"), int) else 0
        self.clock = float(data["clock"]) if isinstance(data.get("clock"), int | float) else 0.0
        for entry in data.get("jobs", []) if isinstance(data.get("jobs"), list) else []:
            try:
                job_id, app, last, broken, stages = entry
                job = _Partial(str(app), float(last), {int(s): [(int(p), int(o)) for p, o in calls]
                                                      for s, calls in stages}, bool(broken))
            except (TypeError, ValueError):
                continue
            self._jobs[str(job_id)] = job


def bootstrap_store(quantile: float) -> GraphStore:
    """A graph store of the vendored deep-research workflows' training half (the half benchmarks never
    draw), so that compound estimates match past jobs before the service has seen any of its own."""
    from tempo.serving.workloads.builder import COMPOUND_APP
    from tempo.serving.workloads.sources import load_workflows, split_workflows

    train, _ = split_workflows(load_workflows())
    return GraphStore(quantile=quantile).extend(
        (COMPOUND_APP, [[(c.input_tokens, c.output_tokens) for c in stage] for stage in flow.stages])
        for flow in train)
