"""Ratios of alternating measurements, paired: each measurement of A divided by the B measured right after it.

On a shared VM the machine's speed drifts by 10-20% over minutes (steal time, neighbours' memory
traffic), which moves A and B together; the ratio of one adjacent pair cancels most of that drift, the
ratio of two medians taken over the whole run does not. The median of the pair ratios is the result;
its quartiles say how far one pair can be trusted.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class PairedRatio:
    median: float
    q1: float  # first quartile of the pair ratios (= median with fewer than 2 pairs)
    q3: float
    pairs: int


def paired_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> PairedRatio:
    """Median and quartiles of numerators[i] / denominators[i]."""
    if len(numerators) != len(denominators) or not numerators:
        raise ValueError(f"paired_ratio needs equal, non-empty lists, got {len(numerators)} and {len(denominators)}")
    ratios = [a / b for a, b in zip(numerators, denominators)]
    median = statistics.median(ratios)
    if len(ratios) < 2:
        return PairedRatio(median, median, median, len(ratios))
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return PairedRatio(median, q1, q3, len(ratios))
