"""Bootstrap intervals and paired differences over eval cases."""

from __future__ import annotations

import numpy as np
import pytest

from ddsedit.shapes import stats


def test_interval_holds_the_statistic_and_narrows_with_more_cases() -> None:
    rng = np.random.default_rng(0)
    few, many = rng.uniform(0.4, 1.0, 20), rng.uniform(0.4, 1.0, 400)
    low, high = stats.bootstrap_interval(few)
    assert low <= np.median(few) <= high
    wide = high - low
    low, high = stats.bootstrap_interval(many)
    assert low <= np.median(many) <= high and high - low < wide / 2


def test_interval_is_seeded_and_degenerate_for_constant_values() -> None:
    values = [0.1, 0.5, 0.9, 0.3]
    assert stats.bootstrap_interval(values, seed=4) == stats.bootstrap_interval(values, seed=4)
    assert stats.bootstrap_interval([0.7] * 10) == (0.7, 0.7)
    with pytest.raises(ValueError):
        stats.bootstrap_interval([])


def test_a_statistic_may_take_several_columns_per_case() -> None:
    kept_and_counts = [[3, 4], [4, 4], [0, 5], [5, 5]]
    low, high = stats.bootstrap_interval(kept_and_counts, lambda rows: rows[:, 0].sum() / rows[:, 1].sum())
    assert low <= 12 / 18 <= high and low < high


def test_paired_difference_cancels_how_hard_each_case_is() -> None:
    rng = np.random.default_rng(1)
    hardness = rng.uniform(0.0, 1.0, 20)  # varies far more between cases than the shift below
    assert stats.paired_difference(hardness, hardness) == (0.0, 0.0, 0.0)
    difference, low, high = stats.paired_difference(hardness, hardness + 0.02)
    assert difference == pytest.approx(0.02) and low == pytest.approx(0.02) and high == pytest.approx(0.02)
    noisy = hardness + 0.05 + rng.normal(0.0, 0.01, 20)
    difference, low, high = stats.paired_difference(hardness, noisy, np.mean)
    assert 0 < low <= difference <= high
    with pytest.raises(ValueError):
        stats.paired_difference([1.0, 2.0], [1.0])
