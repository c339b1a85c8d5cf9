"""Compound jobs in the estimator service against a real Redis: POST /v1/jobs:estimate, finished jobs learned
from completion records (and kept across a restart), bad input refused with a message."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from tempo.estimator.app import create_app
from tempo.estimator.jobs import JobRecorder
from tempo.estimator.settings import Settings

from tests.test_estimator_api import settings_for, wait_for

APP = "agents"  # not the bootstrap's app: everything it knows of it comes from the records below


def calls(job: str, short: bool, t: float) -> list[dict[str, Any]]:
    """A job's completion records: a short job (a short first answer) ends after 2 stages, a long one after 4."""
    first = [(100, 30 if short else 400)]
    stages = [first, [(200, 300), (210, 280)]] + ([] if short else [[(900, 120)], [(300, 500)]])
    records = []
    for stage, stage_calls in enumerate(stages):
        for k, (prompt, output) in enumerate(stage_calls):
            records.append({"request_id": f"{job}.{stage}.{k}", "slo_class": "compound", "app": APP,
                            "prompt_tokens": prompt, "output_tokens": output, "finish_reason": "stop",
                            "finish_s": t + stage, "job_id": job, "stage": stage})
    return records


@pytest.fixture()
def settings(redis_client: Any, redis_url: str, tmp_path: Path) -> Settings:
    return settings_for(redis_url, tmp_path, job_done_s=0.5)


@pytest.fixture()
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:
        yield c


def post_jobs(client: TestClient, n: int, start: float) -> None:
    for i in range(n):
        for record in calls(f"job-{start}-{i}", short=i % 2 == 0, t=start):
            assert client.post("/v1/completions", json=record).status_code == 202


def test_the_bootstrap_store_answers_for_the_vendored_app(client: TestClient) -> None:
    body = client.post("/v1/jobs:estimate", json={"app": "deep_research", "stage": 0, "stage_prompts": [400],
                                                  "job_deadline_s": 100}).json()
    assert body["fallback"] is False and body["stages_after"] >= 1 and body["matched_jobs"] > 10
    assert 0 < body["sub_deadline_fraction"] < 1 and body["stage_deadline_s"] == pytest.approx(
        100 * body["sub_deadline_fraction"])


def test_finished_jobs_are_learned_and_told_apart_by_their_first_stage(client: TestClient,
                                                                      settings: Settings) -> None:
    unknown = client.post("/v1/jobs:estimate", json={"app": APP, "stage": 0, "stage_prompts": [100]}).json()
    assert unknown["fallback"] is True and unknown["stages_after"] == 0  # nothing known of the app yet
    post_jobs(client, 40, time.time() - 60)
    estimator = client.app.state.estimator  # type: ignore[attr-defined]
    wait_for(lambda: estimator.graphs.apps().get(APP, 0) == 40, timeout=20)

    def stages_after(first_output: int) -> int:
        body = client.post("/v1/jobs:estimate", json={"app": APP, "stage": 1, "history": [[[100, first_output]]],
                                                      "stage_prompts": [200, 210]}).json()
        return int(body["stages_after"])

    assert stages_after(30) == 0  # a short first answer: matched to the short jobs, this stage is the last
    assert stages_after(400) == 2  # a long first answer: matched to the long jobs, two stages to go
    # kept across a restart: the graphs are part of the committed online state
    store = client.app.state.store  # type: ignore[attr-defined]

    def committed() -> int:
        state = store.load_online_state() or {}
        return len(state.get("graphs", {}).get("apps", {}).get(APP, {}).get("graphs", []))

    wait_for(lambda: committed() == 40, timeout=10)
    with TestClient(create_app(settings)) as again:
        wait_for(lambda: again.app.state.estimator.graphs.apps().get(APP, 0) == 40,  # type: ignore[attr-defined]
                 timeout=20)


@pytest.mark.parametrize(("body", "message"), [
    ({"stage": 0}, "app"),
    ({"app": APP, "stage": 1}, "history must hold the 1 finished stage"),
    ({"app": APP, "stage": 0, "history": [[[1, 1]]]}, "history must hold the 0 finished stage"),
    ({"app": APP, "stage": 1, "history": [[[10, 0]]]}, "greater than or equal to 1"),
    ({"app": APP, "stage": 1, "history": [[]]}, "at least 1"),
    ({"app": APP, "stage": -1}, "greater than or equal to 0"),
    ({"app": APP, "stage": 0, "stage_prompts": [-5]}, "greater than or equal to 0"),
    ({"app": APP, "stage": 0, "extra": 1}, "extra"),
])
def test_bad_job_estimates_are_422_with_a_message(client: TestClient, body: dict[str, Any], message: str) -> None:
    response = client.post("/v1/jobs:estimate", json=body)
    assert response.status_code == 422, response.text
    assert message.lower() in response.text.lower()


def test_the_recorder_learns_only_whole_quiet_jobs() -> None:
    recorder = JobRecorder(done_after_s=10.0)
    for record in calls("long", short=False, t=0.0):
        assert recorder.observe(record, now=0.0)
    broken = calls("broken", short=False, t=0.0)
    broken[2]["finish_reason"] = "rejected"
    gap = [r for r in calls("gap", short=False, t=0.0) if r["stage"] != 1]  # a stage never recorded
    for record in broken + gap:
        recorder.observe(record, now=0.0)
    assert not recorder.observe({"request_id": "x", "job_id": "", "stage": 0}, now=0.0)
    assert recorder.finished(now=5.0) == []  # still within done_after_s of its last call (at t = 3)
    state = recorder.to_dict()
    learned = recorder.finished(now=20.0)
    assert learned == [(APP, [[(100, 400)], [(200, 300), (210, 280)], [(900, 120)], [(300, 500)]])]
    assert recorder.dropped == 2 and len(recorder) == 0
    again = JobRecorder(done_after_s=10.0)
    again.restore(state)
    assert again.finished(now=20.0) == learned
