"""bench.hotswap counts what it says: gaps inside and outside load windows, on known output times."""

from __future__ import annotations

import math

import pytest

from bench.hotswap import StallRun


def test_gaps_are_split_by_load_windows() -> None:
    # Stream 1: a token every 10 ms, except one 50 ms gap (0.04 -> 0.09) that a load overlaps.
    run = StallRun("known", token_times=[[0.0, 0.01, 0.02, 0.03, 0.04, 0.09, 0.10]], windows=[(0.05, 0.06)])
    outside, during = run.gaps()
    assert during == pytest.approx([0.05])
    assert outside == pytest.approx([0.01] * 5)
    figures = run.figures()
    assert figures["outputs"] == 7 and figures["loads"] == 1
    assert figures["median_gap_ms"] == pytest.approx(10.0)
    assert figures["max_gap_during_loads_ms"] == pytest.approx(50.0)
    assert figures["max_during_over_median"] == pytest.approx(5.0)
    assert figures["max_gap_outside_loads_ms"] == pytest.approx(10.0)
    assert figures["load_p50_ms"] == pytest.approx(10.0)


def test_a_gap_touching_a_window_only_at_an_end_is_outside_it() -> None:
    run = StallRun("edges", token_times=[[0.0, 0.01], [0.02, 0.03]], windows=[(0.01, 0.02)])
    outside, during = run.gaps()
    assert during == [] and len(outside) == 2
    assert math.isnan(run.figures()["max_gap_during_loads_ms"])
