"""The engine's job outlook from the estimator service (``ServiceJobOutlook``) against the real service
(FastAPI app, real Redis): its answers are the service's, and when the service is down, slow, refuses a
job or answers nonsense, the engine's own graphs answer at once, without asking again during a cooldown."""

from __future__ import annotations

import math
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from tempo.estimator.app import create_app
from tempo.models.job_graphs import GraphStore
from tempo.scheduler.jobs import StageOutlook
from tempo.serving.vllm.job_outlook import LOCAL, SERVICE, ServiceJobOutlook, outlook_from_answer

from tests.test_estimator_api import settings_for, wait_for
from tests.test_estimator_jobs import APP, post_jobs

LOCAL_ANSWER = StageOutlook(stages_after=7, samples=3)


class Fixed:
    """The engine's own source, answering one known outlook (and counting the calls)."""

    def __init__(self) -> None:
        self.calls = 0

    def outlook(self, app: str, stage: int, history: Any = (), stage_prompts: Any = ()) -> StageOutlook:
        self.calls += 1
        return LOCAL_ANSWER


@pytest.fixture()
def service(redis_client: Any, redis_url: str, tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(redis_url, tmp_path, job_done_s=0.5))) as client:
        yield client


def counted(http: httpx.Client) -> list[str]:
    """The paths of the requests ``http`` sends from now on."""
    sent: list[str] = []
    http.event_hooks["request"].append(lambda request: sent.append(request.url.path))
    return sent


def test_the_outlook_is_the_services_match(service: TestClient) -> None:
    source = ServiceJobOutlook("unused", Fixed(), http=service)
    estimator = service.app.state.estimator  # type: ignore[attr-defined]
    expected = estimator.estimate_job("deep_research", 1, [[(400, 900)]], [350, 360]).outlook()
    assert source.outlook("deep_research", 1, [[(400, 900)]], [350, 360]) == expected
    assert expected.stages_after >= 1 and expected.samples > 1
    assert source.answered == {SERVICE: 1, LOCAL: 0}


def test_jobs_the_service_learned_reach_the_policy(service: TestClient) -> None:
    """The service learns finished jobs from the records of every replica: the engine's empty store knows
    nothing of the app, the service tells a long job (two stages to go) from a short one (none)."""
    post_jobs(service, 40, time.time() - 60)
    estimator = service.app.state.estimator  # type: ignore[attr-defined]
    wait_for(lambda: estimator.graphs.apps().get(APP, 0) == 40, timeout=20)
    empty = GraphStore()
    source = ServiceJobOutlook("unused", empty, http=service)
    assert empty.outlook(APP, 1, [[(100, 400)]], [200, 210]).stages_after == 0
    assert source.outlook(APP, 1, [[(100, 400)]], [200, 210]).stages_after == 2
    assert source.outlook(APP, 1, [[(100, 30)]], [200, 210]).stages_after == 0


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_service_that_is_down_costs_one_try_per_cooldown() -> None:
    now = [0.0]
    local = Fixed()
    source = ServiceJobOutlook(f"http://127.0.0.1:{_closed_port()}", local, timeout_s=0.5, cooldown_s=5.0,
                               clock=lambda: now[0])
    sent = counted(source.http)
    assert source.outlook("deep_research", 0, (), [100]) == LOCAL_ANSWER
    now[0] = 4.9
    assert source.outlook("deep_research", 0, (), [100]) == LOCAL_ANSWER
    assert len(sent) == 1  # the second was answered locally without a try
    now[0] = 5.1
    source.outlook("deep_research", 0, (), [100])
    assert len(sent) == 2 and source.answered == {SERVICE: 0, LOCAL: 3} and local.calls == 3


def test_a_silent_service_costs_at_most_the_timeout() -> None:
    with socket.socket() as listener:  # accepts connections (the kernel's backlog), never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        source = ServiceJobOutlook(f"http://127.0.0.1:{listener.getsockname()[1]}", Fixed(), timeout_s=0.1)
        started = time.perf_counter()
        assert source.outlook("deep_research", 0, (), [100]) == LOCAL_ANSWER
        assert time.perf_counter() - started < 1.0
        source.close()


def test_a_job_the_service_refuses_falls_back_without_a_cooldown(service: TestClient) -> None:
    source = ServiceJobOutlook("unused", Fixed(), http=service)
    sent = counted(service)
    # an output of 0 tokens is outside the service's schema (422): this job is answered locally ...
    assert source.outlook("deep_research", 1, [[(400, 0)]], [350]) == LOCAL_ANSWER
    # ... and the next one is asked again
    assert source.outlook("deep_research", 1, [[(400, 900)]], [350]) != LOCAL_ANSWER
    assert len(sent) == 2 and source.answered == {SERVICE: 1, LOCAL: 1}


def test_a_job_with_stages_the_engine_lost_is_not_sent() -> None:
    source = ServiceJobOutlook(f"http://127.0.0.1:{_closed_port()}", Fixed())
    sent = counted(source.http)
    assert source.outlook("deep_research", 2, [[(400, 900)]], [350]) == LOCAL_ANSWER
    assert sent == []


GOOD = {"stages_after": 2, "decode_tokens_after": 300, "prefill_tokens_after": 500, "tokens_after": 1600.0,
        "decode_total_after": 600.0, "prefill_total_after": 1000.0, "sub_deadline_fraction": 0.4,
        "matched_jobs": 12.4}


def test_answers_the_policy_cannot_use_are_refused() -> None:
    assert outlook_from_answer(GOOD) == StageOutlook(2, 300, 500, 1600.0, 1000.0, 600.0, 12, 0.4)
    for bad in ({"stages_after": -1}, {"tokens_after": math.nan}, {"decode_total_after": math.inf},
                {"sub_deadline_fraction": 1.5}, {"matched_jobs": "many"}):
        with pytest.raises(ValueError):
            outlook_from_answer({**GOOD, **bad})
    with pytest.raises(KeyError):
        outlook_from_answer({k: v for k, v in GOOD.items() if k != "stages_after"})
