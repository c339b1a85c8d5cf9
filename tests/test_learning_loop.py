"""The learning loop's report: rolling coverage over completions (capped answers count), and its prompts."""

from __future__ import annotations

from tempo.serving.bench.learning_loop import bound_variants, loop_prompts, rolling


def _record(i: int, used: int, bound: int, finish: str = "stop") -> dict[str, object]:
    return {"request_id": f"loop-{i}", "output_tokens": used, "bound": bound, "finish_reason": finish,
            "bound_fallback": False}


def test_rolling_coverage_reaches_q_and_counts_capped_answers() -> None:
    # the first 100 completions are all missed, then 9 of every 10 are covered (one in ten cut at the cap
    # with a bound below it: a miss)
    records = [_record(i, 300, 100) for i in range(100)]
    records += [_record(i, 512, 400, "length") if i % 10 == 0 else _record(i, 50, 100) for i in range(100, 400)]
    got = rolling(records, window=100, quantile=0.9)
    assert got["points"][0]["coverage"] == 0.0 and got["points"][-1]["coverage"] == 0.9
    assert got["within_0.03_from"] == 200  # the first window holding only the learned part
    assert got["capped_completions"] == 30 and got["stop_completions"] == 370
    assert got["points"][-1]["reserved_per_used"] == (90 * 100 + 10 * 400) / (90 * 50 + 10 * 512)


def test_rolling_counts_a_window_exactly_0_03_from_q_as_within() -> None:
    records = [_record(i, 50, 100) if i % 100 >= 7 else _record(i, 300, 100) for i in range(200)]  # 0.93
    assert rolling(records, window=100, quantile=0.9)["within_0.03_from"] == 100


def test_rolling_skips_aborted_and_unbounded_records() -> None:
    records = [_record(i, 10, 20) for i in range(50)] + [_record(50, 10, 20, "abort"), _record(51, 10, 0)]
    got = rolling(records, window=50, quantile=0.9)
    assert got["stop_completions"] == 50 and got["within_0.03_from"] is None  # coverage 1.0, not 0.9


def test_loop_prompts_are_unseen_test_split_chat_and_code() -> None:
    prompts = loop_prompts(40)
    assert len(prompts) == 40 and {cls for cls, _, _ in prompts} == {"latency", "deadline"}
    assert all(app.startswith("chat/" if cls == "latency" else "code/") for cls, app, _ in prompts)
    assert loop_prompts(40) == prompts  # the same prompts on every run


def test_bound_variants_differ_only_in_where_bounds_come_from() -> None:
    variants = bound_variants("redis://127.0.0.1:1/0", "http://127.0.0.1:2")
    assert set(variants) == {"learned", "empirical ladders", "fixed bound"}
    assert "--estimator-url" in variants["learned"] and "--estimator-url" not in variants["fixed bound"]
    assert all(v[:2] == ["--policy", "tempo"] for v in variants.values())
