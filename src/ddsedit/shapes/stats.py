"""How sure a figure is: percentile-bootstrap intervals over the eval's cases.

A median over 20 cases moves by several hundredths when the cases change, and two models run
on different case sets cannot be compared at all; so the eval reports an interval with each
figure, and two runs on the same cases are compared case by case (a paired bootstrap: the
cases are resampled together for both runs, which cancels how hard each case is).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

Statistic = Callable[[np.ndarray], float]
LEVEL = 0.95
RESAMPLES = 2000


def _resampled_indices(count: int, resamples: int, seed: int) -> np.ndarray:
    """``resamples`` rows of ``count`` case indices drawn with replacement (seeded: reports are reproducible)."""
    return np.random.default_rng(seed).integers(count, size=(resamples, count))


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return float(low), float(high)


def bootstrap_interval(
    values: npt.ArrayLike, statistic: Statistic = np.median, level: float = LEVEL,
    resamples: int = RESAMPLES, seed: int = 0,
) -> tuple[float, float]:  # fmt: skip
    """The ``level`` percentile-bootstrap interval of ``statistic`` over ``values`` (one per case)."""
    data = np.asarray(values, dtype=np.float64)  # one row per case (a statistic may need several columns)
    if len(data) == 0:
        raise ValueError("no values to bootstrap")
    estimates = np.array([statistic(data[rows]) for rows in _resampled_indices(len(data), resamples, seed)])
    return _percentiles(estimates, level)


def paired_difference(
    first: npt.ArrayLike, second: npt.ArrayLike, statistic: Statistic = np.median, level: float = LEVEL,
    resamples: int = RESAMPLES, seed: int = 0,
) -> tuple[float, float, float]:  # fmt: skip
    """``statistic(second) - statistic(first)`` on the same cases, and its paired-bootstrap interval.

    Returns ``(difference, low, high)``. The i-th values of both runs must come from the same case.
    """
    a, b = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    if a.shape != b.shape or len(a) == 0:
        raise ValueError(f"paired values must be non-empty and of one length, got {len(a)} and {len(b)}")
    differences = np.array(
        [statistic(b[rows]) - statistic(a[rows]) for rows in _resampled_indices(len(a), resamples, seed)]
    )
    return float(statistic(b) - statistic(a)), *_percentiles(differences, level)
