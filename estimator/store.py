"""Redis: the completion stream with its consumer groups, the online learner's checkpoint, the model registry.

Keys (``P`` is the configured prefix, ``tempo``):

- the stream (``tempo:completions``): one entry per finished request, field ``data`` = the record's JSON;
  ``P:completion:seen:<request id>`` (with a TTL) makes writing a record idempotent per request id.
- groups ``online`` (the learner) and ``retrain`` (the retraining job's cursor).
- ``P:online:state``: the learner's JSON state; committed in one MULTI with the XACK of the records it
  contains, so after a crash the state and the pending entries agree (re-delivered records are applied
  to a state that does not contain them: each record's effect lands exactly once).
- ``P:models`` (hash version -> JSON info: digest of the manifest, metrics, created_at),
  ``P:models:active`` (the active version), ``P:models:history`` (earlier active versions, for rollback).
  Activation and rollback are Lua scripts, atomic on the server.
"""

from __future__ import annotations

import json
from typing import Any

import redis
from tempo.estimator.retention import DEDUPE_TTL_S, STREAM_MAXLEN

from tempo.errors import TempoError

ONLINE_GROUP = "online"
RETRAIN_GROUP = "retrain"
# What "Redis is unavailable" looks like: down or restarting (connection, timeout, still loading), or
# refusing writes (at ``maxmemory`` with noeviction, a read-only replica): retried or degraded, never fatal.
REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError, redis.exceptions.OutOfMemoryError,
                redis.exceptions.ReadOnlyError, redis.exceptions.ExecAbortError)

_APPEND = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
  return redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'data', ARGV[3])
end
return false
"""

_ACTIVATE = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return redis.error_reply('unknown version') end
local previous = redis.call('GET', KEYS[2])
if previous == ARGV[1] then return previous end
redis.call('SET', KEYS[2], ARGV[1])
if previous then redis.call('LPUSH', KEYS[3], previous); redis.call('LTRIM', KEYS[3], 0, 99) end
return previous
"""

_ROLLBACK = """
local previous = redis.call('LPOP', KEYS[3])
if not previous then return redis.error_reply('no earlier version to roll back to') end
redis.call('SET', KEYS[2], previous)
return previous
"""


class UnknownVersion(TempoError):
    """The registry has no such model version."""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def decode_entries(entries: list[Any]) -> list[tuple[str, dict[str, Any] | None]]:
    """(stream id, record or None when the entry is not a JSON record) for XRANGE / XREADGROUP entries."""
    out: list[tuple[str, dict[str, Any] | None]] = []
    for entry_id, fields in entries:
        record = None
        raw = (fields or {}).get(b"data")
        if raw is not None:
            try:
                value = json.loads(raw)
                record = value if isinstance(value, dict) else None
            except (json.JSONDecodeError, UnicodeDecodeError):
                record = None
        out.append((_text(entry_id), record))
    return out


class Store:
    """Thin, synchronous access to everything the estimator keeps in Redis (short socket timeouts)."""

    def __init__(self, url: str, prefix: str = "tempo", stream: str = "tempo:completions",
                 timeout_s: float = 0.5, stream_maxlen: int = STREAM_MAXLEN, dedupe_ttl_s: int = DEDUPE_TTL_S) -> None:
        self.redis = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                          health_check_interval=5)
        self.prefix = prefix
        self.stream = stream
        self.stream_maxlen = stream_maxlen
        self.dedupe_ttl_s = dedupe_ttl_s
        self._append = self.redis.register_script(_APPEND)
        self._activate = self.redis.register_script(_ACTIVATE)
        self._rollback = self.redis.register_script(_ROLLBACK)

    def key(self, *parts: str) -> str:
        return ":".join([self.prefix, *parts])

    def close(self) -> None:
        self.redis.close()

    def ping(self) -> bool:
        try:
            return bool(self.redis.ping())
        except REDIS_ERRORS:
            return False

    # -- completion stream -----------------------------------------------------------------------
    def append_completion(self, record: dict[str, Any]) -> str | None:
        """Append a record; None when this request id was already recorded (idempotent writes)."""
        data = json.dumps(record, separators=(",", ":"))
        result = self._append(keys=[self.key("completion", "seen", record["request_id"]), self.stream],
                              args=[self.dedupe_ttl_s, self.stream_maxlen, data])
        return _text(result) if result else None

    def ensure_group(self, group: str, start: str = "0") -> None:
        try:
            self.redis.xgroup_create(self.stream, group, id=start, mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def read_group(self, group: str, consumer: str, count: int, block_ms: int | None = None,
                   pending: bool = False) -> list[tuple[str, dict[str, Any] | None]]:
        """New entries (``pending=False``) or this consumer's delivered-but-unacknowledged ones."""
        reply: Any = self.redis.xreadgroup(group, consumer, {self.stream: "0" if pending else ">"}, count=count,
                                      block=None if pending else block_ms)
        return decode_entries(reply[0][1]) if reply else []

    def claim_stale(self, group: str, consumer: str, min_idle_ms: int,
                    count: int = 1000) -> list[tuple[str, dict[str, Any] | None]]:
        """Entries pending on other (crashed) consumers for at least ``min_idle_ms``, now ours."""
        out: list[tuple[str, dict[str, Any] | None]] = []
        cursor = "0-0"
        while True:
            reply = self.redis.xautoclaim(self.stream, group, consumer, min_idle_ms, cursor, count=count)
            cursor, entries = _text(reply[0]), reply[1]
            out.extend(decode_entries([e for e in entries if e is not None]))
            if cursor == "0-0" or not entries:
                return out

    def pending_count(self, group: str) -> int:
        info = self.redis.xpending(self.stream, group)
        return int(info["pending"]) if info else 0

    def ack(self, group: str, ids: list[str]) -> None:
        if ids:
            self.redis.xack(self.stream, group, *ids)

    def commit_online(self, state: dict[str, Any], ids: list[str]) -> None:
        """The learner's state and the acknowledgement of the records it contains, in one transaction."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(self.key("online", "state"), json.dumps(state, separators=(",", ":")))
        if ids:
            pipe.xack(self.stream, ONLINE_GROUP, *ids)
        pipe.execute()

    def load_online_state(self) -> dict[str, Any] | None:
        raw = self.redis.get(self.key("online", "state"))
        if raw is None:
            return None
        value = json.loads(raw)
        return value if isinstance(value, dict) else None

    def range(self, start: str = "-", end: str = "+", count: int | None = None,
              page: int = 1000) -> list[tuple[str, dict[str, Any] | None]]:
        """Entries from ``start`` (inclusive) to ``end``, read in pages."""
        out: list[tuple[str, dict[str, Any] | None]] = []
        cursor = start
        while count is None or len(out) < count:
            batch = self.redis.xrange(self.stream, cursor, end, count=page)
            if not batch:
                break
            out.extend(decode_entries(batch))
            cursor = "(" + _text(batch[-1][0])
            if len(batch) < page:
                break
        return out[:count] if count is not None else out

    def recent(self, count: int) -> list[tuple[str, dict[str, Any] | None]]:
        entries: Any = self.redis.xrevrange(self.stream, count=count)
        return decode_entries(entries)

    def length(self) -> int:
        return int(self.redis.xlen(self.stream))

    # -- model registry --------------------------------------------------------------------------
    def register_version(self, version: str, info: dict[str, Any]) -> None:
        self.redis.hset(self.key("models"), version, json.dumps(info, sort_keys=True))

    def versions(self) -> dict[str, dict[str, Any]]:
        raw = self.redis.hgetall(self.key("models"))
        return {_text(k): json.loads(v) for k, v in raw.items()}

    def version_info(self, version: str) -> dict[str, Any] | None:
        raw = self.redis.hget(self.key("models"), version)
        return json.loads(raw) if raw is not None else None

    def active_version(self) -> str | None:
        raw = self.redis.get(self.key("models", "active"))
        return _text(raw) if raw is not None else None

    def activate(self, version: str) -> str | None:
        """Make ``version`` active (atomically); returns the previous active version, kept for rollback."""
        try:
            previous = self._activate(keys=self._registry_keys(), args=[version])
        except redis.ResponseError as exc:
            if "unknown version" in str(exc):
                raise UnknownVersion(f"unknown model version {version!r}") from None
            raise
        return _text(previous) if previous is not None else None

    def rollback(self) -> str:
        """Re-activate the previous version; TempoError when there is none."""
        try:
            return _text(self._rollback(keys=self._registry_keys()))
        except redis.ResponseError as exc:
            raise TempoError(str(exc)) from None

    def history(self) -> list[str]:
        return [_text(v) for v in self.redis.lrange(self.key("models", "history"), 0, -1)]

    def _registry_keys(self) -> list[str]:
        return [self.key("models"), self.key("models", "active"), self.key("models", "history")]

    def set_json(self, name: str, value: dict[str, Any]) -> None:
        self.redis.set(self.key(name), json.dumps(value, sort_keys=True))

    def get_json(self, name: str) -> dict[str, Any] | None:
        raw = self.redis.get(self.key(name))
        return json.loads(raw) if raw is not None else None
