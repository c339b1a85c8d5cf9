"""The offline replay of a recorded learning loop (``tempo estimator replay-loop``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tempo.serving.bench.learning_replay import (
    ideal_windows,
    load_loop,
    prompt_index,
    replay_loop,
    served_after_submission,
    window_stats,
)

from tempo.errors import TempoError

pytest.importorskip("sklearn")


def test_prompt_index_reads_the_loop_id() -> None:
    assert prompt_index("chatcmpl-loop-7-9f34e21e") == 7
    assert prompt_index("loop-12") == 12
    assert prompt_index("chatcmpl-abc") is None


@pytest.mark.parametrize("text,message", [
    ("{not json", "not a readable JSON"),
    (json.dumps({"records": []}), "no 'records'"),
    (json.dumps({"records": [{"request_id": "chatcmpl-x", "output_tokens": 3, "bound": 9}]}), "record 0"),
])
def test_a_file_that_is_not_a_loop_is_refused_in_one_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "loop.json"
    path.write_text(text)
    with pytest.raises(TempoError, match=message):
        load_loop(path)


def test_an_ideal_bound_stays_within_more_often_in_wider_windows() -> None:
    narrow = ideal_windows(600, 100, 0.9, 300, trials=400)
    wide = ideal_windows(600, 300, 0.9, 300, trials=400)
    assert 0.0 <= narrow["p_every_window_within_0.03"] < wide["p_every_window_within_0.03"] <= 1.0
    assert 0.6 < narrow["late_share_within_0.03"] < 0.9  # binomial: sd 0.03 at q = 0.9 over 100


def test_a_bound_is_served_from_the_completions_back_when_its_request_was_sent() -> None:
    # concurrency 2: prompts 0, 1 sent at once, prompt i when the (i - 1)-th answer came back; prompt 1's
    # long answer comes back last, so its bound was served before anything was learned
    ids = [0, 2, 3, 4, 1]
    records = [{"request_id": f"chatcmpl-loop-{i}-x"} for i in ids]
    assert served_after_submission(records, 2) == [0, 1, 2, 3, 0]


def test_window_stats_judge_only_the_late_windows() -> None:
    records = [{"output_tokens": 10, "bound": 5 if k < 50 else 20, "finish_reason": "stop"} for k in range(200)]
    stats = window_stats(records, 20, 0.9, after=100)
    assert stats["late_mean_coverage"] == 1.0 and stats["late_share_within_0.03"] == 0.0
    assert stats["within_0.03_from"] is None


def test_the_replay_learns_short_answers_down_from_the_bootstrap_bound(tmp_path: Path) -> None:
    from tempo.estimator.castillo_stream import small_artifact

    records = [{"request_id": f"chatcmpl-loop-{i}-x", "slo_class": "latency", "app": "chat/Alpaca",
                "output_tokens": 12, "bound": 512, "finish_reason": "stop"} for i in range(160)]
    path = tmp_path / "loop.json"
    path.write_text(json.dumps({"records": records, "concurrency": 4, "max_tokens": 512, "quantile": 0.9}))
    report = replay_loop(path, orders=2, windows=(40,), after=80, artifact=small_artifact())
    stats = report["windows"]["40"]
    assert report["lag"] == 3 and report["completions"] == 160
    assert stats["recorded"]["late_mean_coverage"] == 1.0
    assert stats["replayed_random_orders"]["orders"] == 2
    # every answer is 12 tokens: the calibrators bring the bounds down until some answers are missed
    assert stats["replayed_recorded_order"]["late_mean_coverage"] < 1.0
    # no random orders: their summary is empty, not an error
    alone = replay_loop(path, orders=0, windows=(40,), after=80, artifact=small_artifact())
    assert alone["windows"]["40"]["replayed_random_orders"]["late_mean_coverage"] is None


def test_a_loop_recording_both_prompt_lengths_is_also_replayed_learning_the_engines(tmp_path: Path) -> None:
    from tempo.estimator.castillo_stream import small_artifact

    records = [{"request_id": f"chatcmpl-loop-{i}-x", "slo_class": "latency", "app": "chat/Alpaca",
                "prompt_tokens": 40 + i % 7, "estimate_prompt_tokens": 5 + i % 7, "output_tokens": 10 + i % 5,
                "bound": 512, "finish_reason": "stop"} for i in range(120)]
    path = tmp_path / "loop.json"
    path.write_text(json.dumps({"records": records, "concurrency": 4, "max_tokens": 512, "quantile": 0.9,
                                "retrain": {"started_at": 80, "report": {"status": "activated"}}}))
    report = replay_loop(path, orders=0, windows=(40,), after=80, artifact=small_artifact())
    paths = report["windows"]["40"]
    assert report["retrain_at"] == 80
    for name in ("replayed_recorded_order_with_its_retrain", "replayed_recorded_order_served_at_lag",
                 "replayed_recorded_order_with_its_retrain_learning_engine_prompt_tokens"):
        assert paths[name]["late_mean_coverage"] is not None
