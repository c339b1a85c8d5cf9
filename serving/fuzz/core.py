"""The fuzz loop shared by both services: every operation of an OpenAPI schema, positive and negative
generated cases (schemathesis, on hypothesis), ``requests`` calls in all, every response counted by status.

The budget is split over (operation, mode) pairs by weight; a pair whose input space runs out early (an
endpoint without parameters, a negative mode with no invalid input) hands its remainder to the others in
the next round, so the total reaches ``requests`` unless every pair runs dry.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

SERVER_ERRORS_KEPT = 50  # responses >= 500 kept in the report (all are counted)
BODY_CHARS = 300
ROUNDS = 6
TOP_REFUSALS = 6  # most frequent 4xx messages kept per operation

Prepare = Callable[[Any, str], None]  # (case, mode) -> None; edits the case in place before it is sent


@dataclass
class FuzzTarget:
    """A running service and how to fuzz it."""

    service: str
    schema: Any  # schemathesis BaseSchema
    base_url: str
    headers: dict[str, str] = field(default_factory=dict)  # sent with every call (the admin token)
    prepare: Prepare | None = None
    weight: Callable[[str], float] = lambda label: 1.0  # share of the budget of an operation ("POST /path")
    timeout_s: float = 60.0
    extra: dict[str, Any] = field(default_factory=dict)  # added to the report as it is after the run


@dataclass
class _Pair:
    label: str
    operation: Any
    mode: Any
    quota: int = 0
    calls: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    refusals: Counter[str] = field(default_factory=Counter)  # 4xx messages, digits folded
    dry: bool = False
    error: str | None = None


def _truncate(value: Any, chars: int = BODY_CHARS) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= chars else text[:chars] + "..."


def _message(body: str, chars: int = 90) -> str:
    """The gist of a 4xx answer (OpenAI's ``error.message`` or FastAPI's ``detail``), digits folded to #."""
    import json
    import re

    try:
        data = json.loads(body)
    except ValueError:
        data = body
    if isinstance(data, dict):
        error = data.get("error")
        data = error.get("message", error) if isinstance(error, dict) else data.get("detail", data)
    if isinstance(data, list) and data and isinstance(data[0], dict):  # FastAPI's validation errors
        data = f"{data[0].get('type', '')}: {'.'.join(str(p) for p in data[0].get('loc', []))}"
    text = " ".join(str(data).split())
    return re.sub(r"\d+", "#", text)[:chars]


def _fuzz_test(pair: _Pair, send: Callable[[_Pair, Any], None], examples: int, seed: int) -> Callable[[], None]:
    """A hypothesis test that sends up to ``examples`` generated cases of ``pair``."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed

    @hypothesis_seed(seed)
    @given(case=pair.operation.as_strategy(generation_mode=pair.mode))
    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None,
              phases=[Phase.generate], report_multiple_bugs=False)
    def fuzz(case: Any) -> None:
        send(pair, case)

    return fuzz  # type: ignore[no-any-return]


def run_fuzz(target: FuzzTarget, requests: int, seed: int = 0,
             progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Send about ``requests`` generated requests to ``target``; the JSON-able report."""
    import requests as http
    from hypothesis.errors import Unsatisfiable
    from schemathesis.generation import GenerationMode

    started = time.monotonic()
    pairs: list[_Pair] = []
    schema_errors: list[str] = []
    for result in target.schema.get_all_operations():
        try:
            operation = result.ok()
        except Exception as exc:  # an operation schemathesis cannot read: reported, the rest still fuzzed
            schema_errors.append(_truncate(str(exc)))
            continue
        label = f"{operation.method.upper()} {operation.path}"
        pairs.extend(_Pair(label, operation, mode) for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE))
    if not pairs:
        raise ValueError(f"{target.service}: the schema has no operations")

    by_status: Counter[str] = Counter()
    server_errors: list[dict[str, Any]] = []
    n_server_errors = 0
    total = 0
    session = http.Session()

    def send(pair: _Pair, case: Any) -> None:
        nonlocal total, n_server_errors
        if pair.calls >= pair.quota or total >= requests:
            return
        if target.prepare is not None:
            target.prepare(case, pair.mode.value)
        pair.calls += 1
        total += 1
        try:
            response = case.call(base_url=target.base_url, session=session, headers=dict(target.headers),
                                 timeout=target.timeout_s)
        except http.RequestException as exc:  # no answer at all (a crash, a hang): worse than a 5xx
            status, body = "error", f"{type(exc).__name__}: {exc}"
        else:
            status, body = str(response.status_code), response.text
        pair.statuses[status] += 1
        if status.startswith("4"):
            pair.refusals[_message(body)] += 1
        by_status[status] += 1
        if status == "error" or int(status) >= 500:
            n_server_errors += 1
            if len(server_errors) < SERVER_ERRORS_KEPT:
                server_errors.append({"method": case.method.upper(), "path": case.formatted_path,
                                      "status": status, "mode": pair.mode.value,
                                      "query": _truncate(case.query), "headers": _truncate(case.headers),
                                      "request_body": _truncate(case.body), "body": _truncate(body)})
        if progress is not None and total % 100 == 0:
            progress(f"{target.service}: {total}/{requests} requests, {n_server_errors} server errors")

    for round_no in range(ROUNDS):
        live = [p for p in pairs if not p.dry]
        remaining = requests - total
        if remaining <= 0 or not live:
            break
        weights = [target.weight(p.label) for p in live]
        scale = remaining / sum(weights)
        for pair, weight in zip(live, weights, strict=True):
            pair.quota = pair.calls + max(1, round(weight * scale))
        for pair in live:
            if total >= requests:
                break
            before = pair.calls
            wanted = pair.quota - pair.calls
            try:
                fuzz = _fuzz_test(pair, send, wanted, seed * 1000 + round_no)
                with contextlib.suppress(Unsatisfiable):  # no (invalid) input exists, e.g. GET /health, negative
                    fuzz()
            except Exception as exc:  # generation itself failed: reported, the other operations go on
                pair.error = _truncate(f"{type(exc).__name__}: {exc}")
                pair.dry = True
                continue
            if pair.calls - before < wanted:  # the input space ran out before the quota
                pair.dry = True

    operations: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        entry = operations.setdefault(pair.label, {"requests": 0, "by_status": Counter()})
        entry["requests"] += pair.calls
        entry[pair.mode.value] = pair.calls
        entry["by_status"].update(pair.statuses)
        entry.setdefault("refusals", Counter()).update(pair.refusals)
        if pair.error:
            entry.setdefault("errors", {})[pair.mode.value] = pair.error
    for entry in operations.values():
        entry["by_status"] = dict(sorted(entry["by_status"].items()))
        entry["top_refusals"] = dict(entry.pop("refusals").most_common(TOP_REFUSALS))
    return {
        "service": target.service,
        "requests": total,
        "requested": requests,
        "seed": seed,
        "seconds": round(time.monotonic() - started, 1),
        "by_status": dict(sorted(by_status.items())),
        "server_error_count": n_server_errors,
        "server_errors": server_errors,
        "operations": dict(sorted(operations.items())),
        "schema_errors": schema_errors,
        **target.extra,
    }
