"""What reached Redis: completion records per client request, read incrementally from the stream.

The engine's request id is ``chatcmpl-<X-Request-Id>-<8 chars>`` on the chat route and
``cmpl-<X-Request-Id>-<prompt index>-<8 chars>`` on the completions route, so each record maps back to the
client's request. A request with two records is a duplicate; an answered
request with none is a lost completion. Stream ids carry the write time (ms), which dates each record.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from tempo.estimator.engine import is_true_length
from tempo.estimator.store import ONLINE_GROUP, REDIS_ERRORS, Store

ENGINE_ID = re.compile(r"^(?:chatcmpl-(?P<chat>.+)|cmpl-(?P<completion>.+)-\d+)-[A-Za-z0-9]{8}$")


def client_id(request_id: str) -> str:
    match = ENGINE_ID.match(request_id)
    return (match.group("chat") or match.group("completion")) if match else request_id


@dataclass
class RecordLedger:
    store: Store
    last_id: str = "0-0"
    records: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    written_at_s: dict[str, float] = field(default_factory=dict)  # client id -> first record's write time (epoch)
    learnable: int = 0  # records the online learner should apply (true lengths)
    malformed: int = 0

    def refresh(self) -> bool:
        """Read the entries written since the last call; False when Redis did not answer."""
        try:
            while True:
                entries = self.store.range(start=f"({self.last_id}", count=5000)
                if not entries:
                    return True
                for entry_id, record in entries:
                    self.last_id = entry_id
                    if record is None or "request_id" not in record:
                        self.malformed += 1
                        continue
                    cid = client_id(str(record["request_id"]))
                    self.records[cid].append(record)
                    self.written_at_s.setdefault(cid, int(entry_id.partition("-")[0]) / 1000)
                    if is_true_length(record) and int(record.get("output_tokens") or 0) >= 1:
                        self.learnable += 1
        except REDIS_ERRORS:
            return False

    def learner_state(self) -> tuple[int | None, int | None]:
        """(records applied in the committed online state, entries pending in the online group)."""
        try:
            state = self.store.load_online_state()
            pending = self.store.pending_count(ONLINE_GROUP)
        except REDIS_ERRORS:
            return None, None
        applied = None if state is None else int(state["learner"].get("n_applied", 0))
        return applied, pending

    def committed_id(self) -> str | None:
        """The last stream id in the learner's committed state (None: no state, or Redis did not answer)."""
        try:
            state = self.store.load_online_state()
        except REDIS_ERRORS:
            return None
        return None if state is None else str(state.get("last_id", "0-0"))

    def duplicated(self, ids: set[str]) -> int:
        return sum(1 for i in ids if len(self.records.get(i, ())) > 1)

    def recorded(self, ids: set[str]) -> int:
        return sum(1 for i in ids if self.records.get(i))
