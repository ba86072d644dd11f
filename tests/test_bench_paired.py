"""Paired ratios of alternating measurements (largefr.bench.paired)."""
from __future__ import annotations

import pytest

from largefr.bench.paired import paired_ratio


def test_pair_ratios_cancel_a_drift_the_ratio_of_medians_keeps():
    # the machine slows down 3x halfway; A costs 0.9 of B throughout
    b = [10.0, 10.0, 10.0, 30.0, 30.0]
    a = [9.0, 9.0, 9.0, 27.0, 27.0]
    a[2] = 30.0  # one disturbed pair
    r = paired_ratio(a, b)
    assert r.median == pytest.approx(0.9) and r.pairs == 5
    assert r.q1 == pytest.approx(0.9) and r.q3 == pytest.approx(0.9)
    assert paired_ratio([3.0, 30.0], [4.0, 40.0]).median == pytest.approx(0.75)
    one = paired_ratio([2.0], [4.0])
    assert (one.median, one.q1, one.q3, one.pairs) == (0.5, 0.5, 0.5, 1)


def test_quartiles_bracket_the_median():
    r = paired_ratio([1.0, 2.0, 3.0, 4.0, 5.0], [1.0] * 5)
    assert (r.q1, r.median, r.q3) == (2.0, 3.0, 4.0)


def test_mismatched_or_empty_lists_are_refused():
    with pytest.raises(ValueError, match="got 2 and 1"):
        paired_ratio([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="got 0 and 0"):
        paired_ratio([], [])
