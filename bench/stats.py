"""The statistics benchmarks report: medians and percentiles of timings, paired differences over seeds.

Timings on a shared machine are noisy, so benchmarks interleave what they compare and report the
median of per-repetition ratios (`median_ratio`): a slow spell hits both sides of a pair. Quality
runs are replicated over seeds, and a method is compared with its baseline seed by seed
(`PairedDifference`): the mean and sample sd of the differences, the seeds in which the method is
at least the baseline, and the standard error of a mean over seeds with how many seeds would
resolve a given gain (`seeds_to_resolve`).

Plain functions of lists of numbers: no model, no files, no tables (each benchmark renders its own).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass


def median(xs: Sequence[float]) -> float:
    """The median; NaN for no values (a benchmark that timed nothing)."""
    return statistics.median(xs) if xs else float("nan")


def median_ratio(baseline: Sequence[float], other: Sequence[float]) -> float:
    """The median over paired repetitions of `other[i] / baseline[i]`."""
    return median([b / a for a, b in zip(baseline, other)])


def percentile(xs: Sequence[float], q: float) -> float:
    """The `q`-th percentile (0-100) as the nearest-rank value of the sorted samples; NaN for none."""
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]


def mean_sd(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def standard_error(xs: Sequence[float]) -> float:
    """The standard error of the mean of `xs` (sample sd / sqrt(n)); 0 for a single value."""
    return mean_sd(xs)[1] / math.sqrt(len(xs))


def seeds_to_resolve(sd: float, n: int, gain: float = 2.0) -> int | None:
    """Seeds for a mean `gain` to lie two standard errors from 0 at a per-seed spread `sd`:
    2 * sd / sqrt(k) <= gain, at least 2; None when `n` (the seeds seen) is one, so `sd` is unknown."""
    if n < 2:
        return None
    return max(2, math.ceil((2 * sd / gain) ** 2))


@dataclass
class PairedDifference:
    """A method minus its baseline, replicate by replicate (e.g. seed by seed)."""

    diffs: list[float]
    mean: float
    sd: float  # sample standard deviation (0 for one replicate)
    wins: int  # replicates in which the method is >= the baseline (a tie counts)

    @classmethod
    def of(cls, method: Sequence[float], baseline: Sequence[float]) -> PairedDifference:
        """The paired differences `method[i] - baseline[i]`."""
        return cls.from_diffs([m - b for m, b in zip(method, baseline)])

    @classmethod
    def from_diffs(cls, diffs: Sequence[float]) -> PairedDifference:
        """Differences already taken, one per replicate."""
        mean, sd = mean_sd(diffs)
        return cls(list(diffs), mean, sd, sum(d >= 0 for d in diffs))
