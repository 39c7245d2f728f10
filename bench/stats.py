"""Summary statistics for benchmark figures: percentiles and mean/p50/p99 summaries.

Pure functions on lists of floats, so that every figure a benchmark prints can be checked on known
inputs in a test.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0 <= q <= 100) with linear interpolation between closest ranks.

    The same definition as numpy's default (`linear`), so figures compare with other tools' reports.
    Returns NaN for an empty input: a figure that could not be measured, not zero.
    """
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"q must be in [0, 100], got {q}")
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = math.ceil(rank)
    if low == high:
        return ordered[low]
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def mean(values: Sequence[float]) -> float:
    """The arithmetic mean; NaN for an empty input."""
    if not values:
        return math.nan
    return math.fsum(values) / len(values)


@dataclass(frozen=True)
class Summary:
    """Mean, median and 99th percentile of one figure (a latency in ms, for instance)."""

    mean: float
    p50: float
    p99: float
    count: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def summarize(values: Sequence[float]) -> Summary:
    """Summarise a list of samples; an empty list gives NaN figures and count 0."""
    return Summary(
        mean=mean(values), p50=percentile(values, 50), p99=percentile(values, 99), count=len(values)
    )


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, NaN when the denominator is zero or either side is NaN.

    Ratios of throughputs are printed side by side; a missing run must show as n/a, never crash.
    """
    if math.isnan(numerator) or math.isnan(denominator) or denominator == 0:
        return math.nan
    return numerator / denominator
