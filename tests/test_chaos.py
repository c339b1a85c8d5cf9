"""The fault matrix's parts that need no engine: the proxy's nonsense, request classification, the record
ledger on a real Redis, and the verdict. The matrix itself runs on the real engine (tests/test_vllm_chaos.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis
from tempo.estimator.store import Store
from tempo.serving.bench.engine_client import Observed
from tempo.serving.chaos.faults import FAULTS
from tempo.serving.chaos.ledger import RecordLedger, client_id
from tempo.serving.chaos.proxy import ABSURD, absurd
from tempo.serving.chaos.run import classify, summarize, verdict

from tests.conftest import flush_if_ours


def test_absurd_answers_replace_every_number_and_keep_the_shape() -> None:
    answer = {"estimates": [{"ladder": [[0, 40], [32, 80]], "quantile": 0.9, "fallback": False, "source": "batch"}]}
    out = absurd(answer, [0])
    estimate = out["estimates"][0]
    assert estimate["fallback"] is False and estimate["source"] == "batch"
    numbers = [*(x for step in estimate["ladder"] for x in step), estimate["quantile"]]
    assert all(n in ABSURD for n in numbers) and len(set(numbers)) > 1


def test_engine_request_ids_map_back_to_the_clients() -> None:
    assert client_id("chatcmpl-c12-0a1b2c3d") == "c12"
    assert client_id("chatcmpl-job-3.0.1-0a1b2c3d") == "job-3.0.1"
    assert client_id("cmpl-J4.1.0-0-9f8e7d6c") == "J4.1.0"
    assert client_id("cmpl-req-5-0-9f8e7d6c") == "req-5"
    assert client_id("something-else") == "something-else"


def seen(rid: str, status: int | None, finish: str | None = "length", error: str | None = None,
         sent_s: float = 1.0) -> Observed:
    o = Observed(rid, sent_s=sent_s, finish_reason=finish, status=status, error=error)
    o.token_times_s = [sent_s + 0.1]
    return o


def test_requests_are_classified_by_what_the_client_saw() -> None:
    assert classify(seen("a", 200)) == "answered"
    assert classify(seen("b", 400, None)) == "4xx"
    assert classify(seen("c", 503, None)) == "5xx"
    assert classify(seen("d", 200, None, "ClientPayloadError: peer closed")) == "aborted"
    refused = seen("e", None, None, "ClientConnectorError: refused")
    refused.connect_failed = True
    assert classify(refused) == "refused"
    assert classify(seen("f", None, None, "ServerDisconnectedError")) == "aborted"  # connected, then cut


def test_the_ledger_finds_lost_and_duplicated_completions(redis_client: redis.Redis, redis_url: str) -> None:
    flush_if_ours(redis_client)
    store = Store(redis_url)
    for rid in ("chatcmpl-a-aaaaaaaa", "cmpl-b-0-bbbbbbbb", "cmpl-b-0-cccccccc"):  # b recorded twice
        record = {"request_id": rid, "slo_class": "latency", "prompt_tokens": 3, "output_tokens": 4,
                  "finish_reason": "length"}
        store.redis.xadd(store.stream, {"data": json.dumps(record)})
    ledger = RecordLedger(store)
    assert ledger.refresh() and ledger.learnable == 3
    observed = {k: seen(k, 200) for k in ("a", "b", "c")}  # c answered, never recorded
    row: dict[str, Any] = {"fault": "baseline", "what": "", "window_s": (0.0, 5.0), "held_s": 1.0,
                           "signals_s": {"serving": 0.1, "records": None}, "notes": {}}
    report = summarize([row], observed, ledger, applied=3, pending=0, final={"learner": 0.5})
    first = report["rows"][0]
    assert (first["expected"], first["recorded"], first["lost"], first["duplicated"]) == (3, 2, 1, 1)
    assert first["recovery_s"] is None
    problems = verdict(report)
    assert any("1 completions lost, 1 duplicated" in p for p in problems)
    assert any("never recovered" in p for p in problems)
    assert report["learner"]["exactly_once"] is not False  # 3 applied, 3 learnable


def test_every_fault_names_known_recovery_signals() -> None:
    known = {"serving", "estimator", "records", "learner", "model"}
    assert len(FAULTS) >= 10 and all(set(f.signals) <= known and f.what for f in FAULTS.values())


def test_unknown_faults_are_a_one_line_error() -> None:
    from tempo.serving.chaos.run import ChaosConfig

    from tempo.errors import TempoError

    with pytest.raises(TempoError, match="unknown faults nope"):
        ChaosConfig(["baseline", "nope"]).validate()
