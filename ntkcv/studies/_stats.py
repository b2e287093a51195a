"""The statistics every study reports: bootstrap confidence intervals of a mean and of a Spearman correlation.

All intervals are two-sided percentile bootstraps from :func:`scipy.stats.bootstrap` with a fixed seed, so a
report is reproducible. The percentile method (rather than BCa) because the studies bootstrap over as few as
three seeds, where BCa's acceleration estimate is degenerate; with so few values the interval is crude and
lies within the range of the data, which the tables make visible by printing the number of values.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
RESAMPLES = 2000
SEED = 0


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A statistic of ``n`` finite values with its bootstrap interval ``[low, high]`` (NaN where undefined)."""

    value: float
    low: float
    high: float
    n: int

    @property
    def excludes_zero(self) -> bool:
        """The interval lies strictly on one side of zero."""
        return self.low > 0 or self.high < 0

    @property
    def sign(self) -> int:
        """+1 or -1 when the interval excludes zero on that side, else 0 (including an undefined interval)."""
        return 1 if self.low > 0 else -1 if self.high < 0 else 0

    def __str__(self) -> str:
        return self.format("+.3f")

    def format(self, spec: str) -> str:
        """``value [low, high]`` with each number formatted by ``spec``; the value alone without an interval,
        ``n/a`` without a value."""
        if math.isnan(self.value):
            return "n/a"
        if math.isnan(self.low):
            return format(self.value, spec)
        return f"{self.value:{spec}} [{self.low:{spec}}, {self.high:{spec}}]"


def mean_ci(values: Sequence[float] | np.ndarray) -> Estimate:
    """The mean of the finite ``values`` with its bootstrap 95% interval.

    One value gives an undefined interval (NaN); identical values give the degenerate interval at them.
    """
    x = _finite(values)
    if x.size == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    if x.size == 1:
        return Estimate(mean, math.nan, math.nan, 1)
    if np.ptp(x) == 0:
        return Estimate(mean, mean, mean, int(x.size))
    interval = stats.bootstrap((x,), np.mean, confidence_level=CONFIDENCE, n_resamples=RESAMPLES,
                               method="percentile", rng=np.random.default_rng(SEED)).confidence_interval
    return Estimate(mean, float(interval.low), float(interval.high), int(x.size))


def spearman_ci(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> Estimate:
    """Spearman's ρ of the pairs where both values are finite, with a paired bootstrap 95% interval.

    Fewer than three pairs, or a constant variable, give NaN. With very few pairs a resample can draw a
    constant variable, whose ρ is undefined; the interval is then NaN too.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D of the same length, got shapes {x.shape} and {y.shape}")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    n = int(x.size)
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return Estimate(math.nan, math.nan, math.nan, n)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)  # the NaN interval says it
        interval = stats.bootstrap((x, y), _spearman, paired=True, vectorized=True, confidence_level=CONFIDENCE,
                                   n_resamples=RESAMPLES, method="percentile",
                                   rng=np.random.default_rng(SEED)).confidence_interval
    return Estimate(float(_spearman(x, y)), float(interval.low), float(interval.high), n)


def finite_mean(values: Sequence[float] | np.ndarray) -> float:
    """The mean of the finite ``values``; NaN when there are none."""
    x = _finite(values)
    return float(x.mean()) if x.size else math.nan


def _spearman(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """ρ along ``axis``: the Pearson correlation of the average ranks (NaN for a constant sample)."""
    rx, ry = stats.rankdata(x, axis=axis), stats.rankdata(y, axis=axis)
    rx, ry = rx - rx.mean(axis, keepdims=True), ry - ry.mean(axis, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (rx * ry).sum(axis) / np.sqrt((rx**2).sum(axis) * (ry**2).sum(axis))


def _finite(values: Sequence[float] | np.ndarray) -> np.ndarray:
    x = np.asarray(values, np.float64).ravel()
    return x[np.isfinite(x)]
