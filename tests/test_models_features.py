"""Hashed prompt features: stable, batch equals one-by-one, and no text is a valid input."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from tempo.models.features import FeatureSpec, PromptSketch, hashed_batch, hashed_ngrams

SPEC = FeatureSpec()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(max_size=300), min_size=1, max_size=6))
def test_batch_hashing_equals_hashing_each_text_alone(texts: list[str]) -> None:
    matrix = hashed_batch(texts, SPEC)
    for i, text in enumerate(texts):
        index, weights = hashed_ngrams(text, SPEC)
        row = matrix[i]
        assert np.array_equal(row.indices, index)
        assert np.allclose(row.data, weights)
        if len(weights):
            assert np.isclose(np.linalg.norm(weights), 1.0)


def test_texts_without_ngrams_give_empty_sketches() -> None:
    for text in ("", "!!", " ", "\x00"):
        index, weights = hashed_ngrams(text, SPEC)
        assert len(index) == len(weights) == 0


def test_hashing_ignores_case_and_sketches_round_trip() -> None:
    index, _ = hashed_ngrams("Hello world", SPEC)
    assert np.array_equal(index, hashed_ngrams("hello WORLD", SPEC)[0])
    sketch = PromptSketch.of("Hello world", SPEC)
    restored = PromptSketch.from_dict(sketch.to_dict(), SPEC)
    assert np.array_equal(restored.indices, sketch.indices) and restored.n_words == 2
