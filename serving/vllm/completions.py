"""Completion records from the engine to Redis: queued in the step loop, written by a background thread.

The scheduler's finish hook only appends the record to a deque (no I/O in the step loop). A daemon
thread writes each record to the ``tempo:completions`` stream with the estimator store's idempotent
append (a Lua script: ``SET seen:<id> NX`` then ``XADD``, one step on the server), so a retry after a
lost reply never duplicates a record: each finished request is in the stream exactly once.

While Redis is down the records stay queued (up to ``buffer_limit``; beyond that the oldest are dropped
and counted) and the thread retries with backoff (0.1 s doubling to 2 s). At shutdown whatever could not
be written is appended to a spill file (JSONL), which the next start replays first: a restart of
``tempo serve`` during an outage loses nothing either.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("tempo.serving.completions")


class CompletionWriter:
    """``put(record)`` from the step loop; ``stop()`` at shutdown. ``on_record`` (metrics) runs in the thread,
    once per record."""

    def __init__(self, store: Any | None, buffer_limit: int = 100_000, spill_path: Path | None = None,
                 store_prompt_text: bool = False,
                 on_record: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.store = store  # tempo.estimator.store.Store, or None (records are counted, not written)
        self.buffer: deque[dict[str, Any]] = deque()
        self.buffer_limit = buffer_limit
        self.spill_path = spill_path
        self.store_prompt_text = store_prompt_text
        self.on_record = on_record
        self.written = 0
        self.duplicates = 0
        self.dropped = 0
        self.failures = 0
        self.spilled = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._replay_left: dict[str, int] = {}
        self._load_spill()
        self.thread = threading.Thread(target=self._run, name="tempo-completions", daemon=True)
        self.thread.start()

    # -- the step loop's side ----------------------------------------------------------------------
    def put(self, record: dict[str, Any]) -> None:
        """Queue a record (O(1), no I/O)."""
        if not self.store_prompt_text:
            record.pop("prompt", None)
        self.buffer.append(record)
        self._idle.clear()
        self._wake.set()

    # -- the thread ---------------------------------------------------------------------------------
    def _run(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            self._wake.wait(0.5)
            self._wake.clear()
            while self.buffer and not self._stop.is_set():
                if self._write_one():
                    backoff = 0.1
                    continue
                self._stop.wait(backoff)
                backoff = min(2.0, backoff * 2)
            if not self.buffer:
                self._idle.set()

    def _write_one(self) -> bool:
        """Write the oldest record; False (it stays queued) when Redis failed."""
        record = self.buffer[0]
        if self.on_record is not None and not record.get("_counted"):
            try:
                self.on_record(record)
            except Exception:  # metrics must never stop the writer
                log.exception("completion metrics failed")
            record["_counted"] = True
        sketch = record.get("sketch")
        if isinstance(sketch, str):  # the front end's packed sketch travels as JSON text in vllm_xargs
            try:
                record["sketch"] = json.loads(sketch)
            except json.JSONDecodeError:
                record.pop("sketch")
        if self.store is not None:
            from tempo.estimator.store import REDIS_ERRORS

            data = {k: v for k, v in record.items() if not k.startswith("_")}
            try:
                stream_id = self.store.append_completion(data)
            except REDIS_ERRORS:
                self.failures += 1
                self._trim()
                return False
            if stream_id is None:
                self.duplicates += 1
            else:
                self.written += 1
        self._replayed(self.buffer.popleft())
        return True

    def _trim(self) -> None:
        while len(self.buffer) > self.buffer_limit:
            self.buffer.popleft()
            self.dropped += 1
        if self.dropped and self.dropped % 1000 == 1:
            log.error("completion buffer full: %d records dropped so far", self.dropped)

    # -- lifecycle ----------------------------------------------------------------------------------
    def flush(self, timeout_s: float) -> bool:
        """Wait until every queued record is written (True) or the timeout passes (False)."""
        self._wake.set()
        return self._idle.wait(timeout_s) and not self.buffer

    def stop(self, timeout_s: float = 5.0) -> None:
        """Flush what can be flushed in ``timeout_s``; spill the rest to the spill file."""
        self.flush(timeout_s)
        self._stop.set()
        self._wake.set()
        self.thread.join(timeout_s)
        if self.buffer and self.spill_path is not None:
            self.spill_path.parent.mkdir(parents=True, exist_ok=True)
            with self.spill_path.open("a", encoding="utf-8") as out:
                while self.buffer:
                    record = self.buffer.popleft()
                    if record.get("_replay"):
                        continue  # still in its claimed file, which the next start replays
                    out.write(json.dumps({k: v for k, v in record.items() if not k.startswith("_")}) + "\n")
                    self.spilled += 1
            log.warning("%d completion records could not be written; kept in %s", self.spilled, self.spill_path)

    def _load_spill(self) -> None:
        """Queue the records an earlier run could not write (the idempotent append drops duplicates).

        The spill file is renamed (claimed) first, so a second server starting now does not replay it too,
        and deleted only once every record in it left the queue: a crash during the replay keeps it."""
        path = self.spill_path
        if path is None or self.store is None or not path.parent.is_dir():
            return
        if path.is_file():
            path.rename(path.with_name(f"{path.name}.{time.time_ns()}.replay"))
        for claimed in sorted(path.parent.glob(f"{path.name}.*.replay")):
            count = 0
            for line in claimed.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and "request_id" in record:
                    record["_counted"] = True  # counted by the run that made it
                    record["_replay"] = str(claimed)
                    self.buffer.append(record)
                    count += 1
            self._replay_left[str(claimed)] = count
            if count == 0:
                claimed.unlink()
        if self.buffer:
            self._idle.clear()
            log.info("replaying %d completion records from %s", len(self.buffer), path)

    def _replayed(self, record: dict[str, Any]) -> None:
        source = record.get("_replay")
        if source is None:
            return
        self._replay_left[source] -= 1
        if self._replay_left[source] == 0:
            Path(source).unlink(missing_ok=True)

    def counters(self) -> dict[str, int]:
        return {"written": self.written, "duplicates": self.duplicates, "dropped": self.dropped,
                "failures": self.failures, "spilled": self.spilled, "queued": len(self.buffer)}
