"""Conformal calibration on synthetic data with known quantiles, and ladder invariants."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tempo.models.calibration import MondrianCalibrator, conformal_quantile
from tempo.models.length_bounds import _monotone_ladder
from tempo.scheduler.bounds import BoundLadder


def test_conformal_quantile_is_the_finite_sample_rank() -> None:
    scores = np.arange(1.0, 10.0)  # n = 9: rank ceil(10 * 0.9) = 9 -> the largest
    assert conformal_quantile(scores, 0.9) == 9.0
    assert conformal_quantile(scores, 0.5) == 5.0
    assert conformal_quantile(scores, 0.95) == float("inf")  # 9 samples cannot certify 0.95


@pytest.mark.parametrize("quantile", [0.8, 0.9, 0.95])
def test_calibration_recovers_known_quantiles(quantile: float) -> None:
    """A model biased low by 30% on lognormal lengths is corrected to coverage q on fresh data."""
    rng = np.random.default_rng(1)
    n = 20_000
    median = rng.uniform(20, 500, n)
    true = median * rng.lognormal(0, 0.4, n)
    raw = 0.7 * median  # knows the median, misses the spread
    cal = MondrianCalibrator(quantile).fit(raw[:10_000], true[:10_000])
    covered = np.mean(true[10_000:] <= cal.apply(raw[10_000:]))
    assert quantile - 0.01 <= covered <= quantile + 0.015
    exact = 0.4 * 1.2815515655446004 if quantile == 0.9 else None  # z_0.9 for sigma 0.4
    if exact is not None:
        assert cal.pooled_ == pytest.approx(np.log(1 / 0.7) + exact, abs=0.03)


def test_mondrian_groups_get_their_own_offsets_with_fallback() -> None:
    rng = np.random.default_rng(2)
    true_a = rng.lognormal(np.log(100), 0.2, 5000)
    true_b = rng.lognormal(np.log(100), 0.8, 5000)
    raw = np.full(10_000, 100.0)
    true = np.concatenate([true_a, true_b])
    groups = [("m|a", "a")] * 5000 + [("m|b", "b")] * 5000
    cal = MondrianCalibrator(0.9, min_group=300).fit(raw, true, groups)
    assert cal.offset(("m|a", "a")) < cal.offset(("m|b", "b"))
    # a chain with no calibrated key falls back to its app, then to the pooled offset
    assert cal.offset(("other|a", "a")) == cal.offset("a")
    assert cal.offset(("x|y", "y")) == cal.pooled_
    bounds_a = cal.apply(raw[:5000], groups[:5000])
    assert 0.88 <= np.mean(true_a <= bounds_a) <= 0.92


ladder_steps = st.lists(st.tuples(st.integers(1, 5000), st.integers(1, 8000)), max_size=10)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 5000), ladder_steps, st.integers(0, 20_000))
def test_model_ladders_are_monotone_and_above_k(b0: int, raw: list[tuple[int, int]], generated: int) -> None:
    ks = np.array(sorted(k for k, _ in raw), dtype=float)
    bounds = np.array([b for _, b in raw], dtype=float)
    ladder = _monotone_ladder(b0, ks, bounds, 0.9)  # BoundLadder's own checks run here
    steps = ladder.steps
    assert steps[0] == (0, b0)
    assert all(k1 > k0 and c1 >= c0 for (k0, c0), (k1, c1) in itertools.pairwise(steps))
    assert ladder.bound_at(generated) > generated
    assert ladder.remaining_at(generated, max_tokens=generated + 7) >= 1


def test_bound_ladder_lookup_and_runaway_generations() -> None:
    ladder = BoundLadder(((0, 100), (50, 120), (70, 150)))
    assert [ladder.bound_at(k) for k in (0, 49, 50, 69, 70, 149)] == [100, 100, 120, 120, 150, 150]
    assert ladder.bound_at(150) == 150 + 80  # past the ladder: the last step's remaining length
    assert ladder.bound_at(150, max_tokens=4096) == 4096
    with pytest.raises(ValueError):
        BoundLadder(((0, 100), (50, 90)))
    with pytest.raises(ValueError):
        BoundLadder(((10, 100),))
