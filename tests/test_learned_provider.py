"""The learned bound provider: the length model in the benchmark, on unseen prompts only."""

from __future__ import annotations

from pathlib import Path

import pytest
from tempo.data.castillo import load_length_rows, load_prompts, prompt_split
from tempo.scheduler.bounds import BoundLadder, BoundQuery
from tempo.scheduler.slo import SLOClass
from tempo.serving.bounds.learned import LearnedProvider, fit_learned
from tempo.serving.bounds.providers import FixedProvider

from tempo.errors import TempoError

MODEL = "meta-llama--Llama-3.1-8B-Instruct"


@pytest.fixture(scope="module")
def data() -> tuple[list, dict[str, str]]:
    rows = [r for r in load_length_rows() if r.model == MODEL]
    return rows[::6], load_prompts()  # a sixth of one model's rows: seconds to fit


def test_learned_ladders_for_text_requests_and_fallback_for_compound(data, tmp_path: Path) -> None:
    rows, prompts = data
    model, seen = fit_learned(rows, prompts, [MODEL], 0.9, cache=tmp_path)
    fallback = FixedProvider(777)
    provider = LearnedProvider(model, fallback, seen)
    unseen = [r for r in rows if prompt_split(r.prompt_id) == "test"][:20]
    queries = [BoundQuery(f"q{i}", r.input_tokens, SLOClass.DEADLINE, r.dataset, MODEL, prompts[r.prompt_id])
               for i, r in enumerate(unseen)]
    queries.append(BoundQuery("job", 50, SLOClass.COMPOUND, "deep_research", MODEL, "Summarise the findings"))
    ladders = provider.ladders(queries)
    assert all(isinstance(ladder, BoundLadder) for ladder in ladders)
    assert ladders[-1].initial == 777  # compound: the fallback's ladder
    assert any(ladder.initial != 777 and len(ladder.steps) > 1 for ladder in ladders[:-1])  # tightening ladders
    assert {prompts[r.prompt_id] for r in unseen}.isdisjoint(seen)


def test_learned_for_deadline_only_leaves_chat_to_the_fallback(data, tmp_path: Path) -> None:
    rows, prompts = data
    model, seen = fit_learned(rows, prompts, [MODEL], 0.9, cache=tmp_path)
    provider = LearnedProvider(model, FixedProvider(777), seen, frozenset({SLOClass.DEADLINE}))
    unseen = [r for r in rows if prompt_split(r.prompt_id) == "test"][:10]
    queries = [BoundQuery(f"q{i}", r.input_tokens, cls, r.dataset, MODEL, prompts[r.prompt_id])
               for i, r in enumerate(unseen) for cls in (SLOClass.LATENCY, SLOClass.DEADLINE)]
    pairs = list(zip(queries, provider.ladders(queries), strict=True))
    assert all(ladder.initial == 777 for q, ladder in pairs if q.slo_class is SLOClass.LATENCY)
    assert any(ladder.initial != 777 for q, ladder in pairs if q.slo_class is SLOClass.DEADLINE)


def test_learned_refuses_prompts_it_was_trained_on(data, tmp_path: Path) -> None:
    rows, prompts = data
    model, seen = fit_learned(rows, prompts, [MODEL], 0.9, cache=tmp_path)
    trained = next(r for r in rows if prompt_split(r.prompt_id) == "fit")
    query = BoundQuery("q", trained.input_tokens, SLOClass.LATENCY, trained.dataset, MODEL, prompts[trained.prompt_id])
    with pytest.raises(TempoError, match="--prompt-split test"):
        LearnedProvider(model, FixedProvider(10), seen).ladders([query])


def test_learned_artifact_is_cached_and_rebuilt_when_tampered(data, tmp_path: Path) -> None:
    rows, prompts = data
    first, _ = fit_learned(rows, prompts, [MODEL], 0.9, cache=tmp_path)
    (directory,) = tmp_path.iterdir()
    stamp = (directory / "manifest.json").stat().st_mtime_ns
    again, _ = fit_learned(rows, prompts, [MODEL], 0.9, cache=tmp_path)
    assert (directory / "manifest.json").stat().st_mtime_ns == stamp  # loaded, not refitted
    assert again.calibration_ is not None and first.calibration_ is not None
    assert again.calibration_.offsets == pytest.approx(first.calibration_.offsets)
    victim = next(p for p in directory.iterdir() if p.name != "manifest.json")
    victim.write_bytes(victim.read_bytes() + b" ")
    fit_learned(rows, prompts, [MODEL], 0.9, cache=tmp_path)  # fails verification: refitted
    assert next(tmp_path.iterdir()) == directory and (directory / "manifest.json").stat().st_mtime_ns != stamp


def test_learned_needs_rows_of_the_served_model(data, tmp_path: Path) -> None:
    rows, prompts = data
    with pytest.raises(TempoError, match="no CASTILLO rows"):
        fit_learned(rows, prompts, ["nobody/model"], 0.9, cache=tmp_path)
