"""bench/stats.py as a library: each statistic against the sum or the sorted list written out here."""

from __future__ import annotations

import math

import pytest

from bench.stats import (
    PairedDifference,
    mean_sd,
    median,
    median_ratio,
    percentile,
    seeds_to_resolve,
    standard_error,
)


def test_median_and_median_of_paired_ratios():
    assert median([3.0, 1.0, 2.0]) == 2.0 and math.isnan(median([]))
    # ratios 2, 0.5, 3: the pairs, not the medians of each side (median 2 / median 2 would be 1)
    assert median_ratio([1.0, 4.0, 2.0], [2.0, 2.0, 6.0]) == 2.0


def test_percentile_is_the_nearest_rank_of_the_sorted_samples():
    xs = [float(x) for x in range(101, 0, -1)]  # 101 .. 1, unsorted
    assert percentile(xs, 50) == 51.0 and percentile(xs, 99) == 100.0 and percentile(xs, 100) == 101.0
    assert percentile([5.0], 99) == 5.0 and math.isnan(percentile([], 50))


def test_mean_sd_and_standard_error():
    mean, sd = mean_sd([1.0, 2.0, 6.0])
    assert mean == pytest.approx(3.0)
    assert sd == pytest.approx(math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2))  # sample sd
    assert standard_error([1.0, 2.0, 6.0]) == pytest.approx(sd / math.sqrt(3))
    assert mean_sd([4.0]) == (4.0, 0.0) and standard_error([4.0]) == 0.0


def test_paired_difference_counts_ties_as_wins():
    d = PairedDifference.of([62.0, 57.0, 80.0], [60.0, 58.0, 80.0])
    assert d.diffs == [2.0, -1.0, 0.0] and d.wins == 2
    assert (d.mean, d.sd) == (pytest.approx(1 / 3), pytest.approx(math.sqrt((25 / 9 + 16 / 9 + 1 / 9) / 2)))
    assert PairedDifference.from_diffs([2.0, -1.0, 0.0]) == d


def test_seeds_to_resolve_a_gain_two_standard_errors_from_zero():
    # 2 * sd / sqrt(k) <= gain: sd 6.36 and gain 2 need k >= 40.4, so 41 seeds
    assert seeds_to_resolve(6.36, 2) == 41
    assert seeds_to_resolve(0.5, 3) == 2  # never fewer than two
    assert seeds_to_resolve(3.0, 5, gain=1.0) == 36
    assert seeds_to_resolve(3.0, 1) is None  # one seed: no spread to go by
