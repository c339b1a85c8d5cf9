"""Background loops of the service: the online learner (consumer group ``online``) and the registry watcher.

Delivery guarantee: at-least-once delivery, exactly-once effect. The learner's state is committed in one
Redis transaction with the XACK of every record it contains (``Store.commit_online``); a record applied
but not yet committed when the worker dies stays pending and is re-delivered on restart (own pending
entries first, then stale entries of other consumers are claimed), and applied to the restored state,
which does not contain it. Stream ids only grow, so a record at or below the state's ``last_id`` is
skipped (idempotent application, e.g. a claim racing a commit).

Redis outages: every loop catches connection errors, backs off (0.1 s doubling to 5 s) and resumes by
itself; requests are answered from memory meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tempo.estimator.engine import Estimator, ServedModel
from tempo.estimator.settings import Settings
from tempo.estimator.store import ONLINE_GROUP, REDIS_ERRORS, Store
from tempo.models.artifact import ArtifactError
from tempo.models.job_graphs import GraphStore
from tempo.models.online import OnlineLengthLearner

log = logging.getLogger("tempo.estimator.worker")


def _id_tuple(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


class OnlineWorker:
    """Reads completions, applies them to the estimator's learner, commits state + acks together."""

    def __init__(self, store: Store, estimator: Estimator, settings: Settings,
                 on_applied: Callable[[list[tuple[str, str, float, float]], int], None] | None = None) -> None:
        self.store = store
        self.estimator = estimator
        self.settings = settings
        self.on_applied = on_applied
        self.last_id = "0-0"
        self.uncommitted: list[str] = []
        self.last_commit = time.monotonic()
        self.started = False
        self.applied = 0  # records applied by this process (re-deliveries included)
        self.skipped = 0  # re-delivered records already in the state
        self.dropped = 0  # entries that were not valid records (acknowledged, not applied)
        self.jobs_changed = False  # the graph store learned a job since the last commit

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Restore the committed state, then re-apply this consumer's and stale consumers' pending entries."""
        self.store.ensure_group(ONLINE_GROUP)
        state = self.store.load_online_state()
        if state is not None:
            self.estimator.set_learner(OnlineLengthLearner.from_dict(state["learner"]))
            self.last_id = str(state.get("last_id", "0-0"))
            self._restore_jobs(state)
        self.uncommitted = []
        consumer = self.settings.consumer
        while True:
            pending = self.store.read_group(ONLINE_GROUP, consumer, self.settings.worker_batch, pending=True)
            if not pending:
                break
            self._apply(pending)
            self.commit()  # acknowledges them, so the next read of our pending list moves on
        self._apply(self.store.claim_stale(ONLINE_GROUP, consumer, self.settings.claim_idle_ms))
        self.commit()
        self.started = True

    def run_once(self) -> int:
        """One read-apply step (blocks up to ``worker_block_ms``); commits when due. Returns records read."""
        if not self.started:
            self.start()
        entries = self.store.read_group(ONLINE_GROUP, self.settings.consumer, self.settings.worker_batch,
                                        block_ms=self.settings.worker_block_ms)
        self._apply(entries)
        if not entries and self.estimator.learn_jobs():  # caught up: jobs that went quiet since their last call
            self.jobs_changed = True
        due = (len(self.uncommitted) >= self.settings.checkpoint_every
               or time.monotonic() - self.last_commit >= self.settings.checkpoint_interval_s)
        if (self.uncommitted or self.jobs_changed) and due:
            self.commit()
        return len(entries)

    def commit(self) -> None:
        learner = self.estimator.learner
        with self.estimator.lock:
            state = {"learner": learner.to_dict(), "last_id": self.last_id,
                     "graphs": self.estimator.graphs.to_dict(), "jobs": self.estimator.jobs.to_dict()}
        self.store.commit_online(state, self.uncommitted)
        self.uncommitted = []
        self.jobs_changed = False
        self.last_commit = time.monotonic()

    def _restore_jobs(self, state: dict[str, Any]) -> None:
        """The graph store and the partial jobs of the committed state (a state from before issue #12 has
        neither: the store starts from what the service was given)."""
        estimator = self.estimator
        with estimator.lock:
            if isinstance(state.get("graphs"), dict):
                try:
                    estimator.graphs = GraphStore.from_dict(state["graphs"])
                except (KeyError, TypeError, ValueError) as exc:
                    log.warning("committed graph store unreadable (%s): keeping the bootstrap store", exc)
            if isinstance(state.get("jobs"), dict):
                estimator.jobs.restore(state["jobs"])

    def _apply(self, entries: list[tuple[str, dict[str, Any] | None]]) -> None:
        fresh: list[dict[str, Any]] = []
        for entry_id, record in entries:
            self.uncommitted.append(entry_id)
            if _id_tuple(entry_id) <= _id_tuple(self.last_id):
                self.skipped += 1
                continue
            self.last_id = entry_id
            if record is None or not _valid(record):
                self.dropped += 1
                continue
            fresh.append(record)
        if not fresh:
            return
        if self.settings.apply_delay_s:
            for i in range(len(fresh)):  # fault injection: apply slowly, one by one
                self._apply_records(fresh[i : i + 1])
                time.sleep(self.settings.apply_delay_s)
        else:
            self._apply_records(fresh)

    def _apply_records(self, records: list[dict[str, Any]]) -> None:
        applied, updates = self.estimator.apply(records)
        self.applied += applied
        self.dropped += len(records) - applied
        if self.on_applied is not None:
            self.on_applied(updates, applied)


def _valid(record: dict[str, Any]) -> bool:
    try:
        return (int(record["output_tokens"]) >= 1 and int(record["prompt_tokens"]) >= 0
                and isinstance(record["slo_class"], str))
    except (KeyError, TypeError, ValueError):
        return False


class RegistryWatcher:
    """Follows the registry's active pointer and hot-swaps the served model (verified before use)."""

    def __init__(self, store: Store, estimator: Estimator, artifacts_dir: Path,
                 on_swap: Callable[[str | None], None] | None = None) -> None:
        self.store = store
        self.estimator = estimator
        self.artifacts_dir = artifacts_dir
        self.on_swap = on_swap
        self.failed: dict[str, str] = {}  # version -> why it could not be loaded (not retried)

    def poll(self) -> bool:
        """Load the active version when it differs from the served one; True when it swapped."""
        active = self.store.active_version()
        if active is None or active == self.estimator.version or active in self.failed:
            return False
        info = self.store.version_info(active) or {}
        try:
            served = ServedModel.load(self.artifacts_dir / active, info.get("digest"))
        except (ArtifactError, OSError, ValueError) as exc:
            self.failed[active] = str(exc)
            log.error("cannot serve model %s: %s", active, exc)
            return False
        self.estimator.swap(served)
        if self.on_swap is not None:
            self.on_swap(active)
        log.info("serving model %s", active)
        return True


class Background:
    """The worker and watcher loops in one daemon thread, resilient to Redis outages."""

    def __init__(self, worker: OnlineWorker | None, watcher: RegistryWatcher, poll_s: float,
                 on_redis: Callable[[bool], None] | None = None) -> None:
        self.worker = worker
        self.watcher = watcher
        self.poll_s = poll_s
        self.on_redis = on_redis
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="tempo-estimator-background", daemon=True)
        self.errors = 0

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self.stop_event.set()
        self.thread.join(timeout)
        if self.worker is not None and self.worker.started and self.worker.uncommitted:
            with contextlib.suppress(*REDIS_ERRORS):  # else they stay pending: re-delivered on restart
                self.worker.commit()

    def _run(self) -> None:
        backoff = 0.1
        next_poll = 0.0
        while not self.stop_event.is_set():
            try:
                if time.monotonic() >= next_poll:
                    self.watcher.poll()
                    next_poll = time.monotonic() + self.poll_s
                if self.worker is not None:
                    self.worker.run_once()
                else:
                    self.stop_event.wait(self.poll_s)
                if self.on_redis is not None:
                    self.on_redis(True)
                backoff = 0.1
            except REDIS_ERRORS as exc:
                self.errors += 1
                if self.on_redis is not None:
                    self.on_redis(False)
                log.warning("redis unavailable (%s); retrying in %.1f s", exc, backoff)
                if self.worker is not None:
                    self.worker.started = False  # re-sync state and pending entries on reconnect
                self.stop_event.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            except Exception:  # a bug must not kill learning silently forever: log, back off, go on
                self.errors += 1
                log.exception("estimator background loop failed")
                self.stop_event.wait(backoff)
                backoff = min(backoff * 2, 5.0)
