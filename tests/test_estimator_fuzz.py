"""Schema-based fuzzing (schemathesis) of the running service's OpenAPI spec: no input gives a 5xx.

The fuzz loop is ``tempo.serving.fuzz`` (``tempo fuzz estimator`` runs the full figure); here a small budget,
in-process with uvicorn in a thread, on the session's Redis."""

from __future__ import annotations

from pathlib import Path

import redis
from tempo.serving.fuzz.estimator import fuzz_estimator_at

from tests.conftest import flush_if_ours

REQUESTS = 300


def test_no_server_errors(redis_url: str, tmp_path: Path) -> None:
    """Every operation, positive and negative generated cases, with the admin token so that admin endpoints
    are exercised past authentication."""
    flush_if_ours(redis.Redis.from_url(redis_url))
    report = fuzz_estimator_at(redis_url, tmp_path / "artifacts", REQUESTS, seed=0)
    print(f"fuzz: {len(report['operations'])} operations, {report['requests']} calls, by status "
          f"{report['by_status']}, {report['server_error_count']} server errors")
    assert report["requests"] >= REQUESTS * 0.9
    assert all(entry["requests"] > 0 for entry in report["operations"].values()), report["operations"]
    assert not report["schema_errors"]
    assert report["server_error_count"] == 0, report["server_errors"][:5]
    flush_if_ours(redis.Redis.from_url(redis_url))

