r"""Scaling-law fits for the studies: a power law or a logarithm of a CV (or its change) against width, depth,
data size or time, with a bootstrap interval on the exponent (slope) and a goodness of fit.

Both laws are straight lines after a change of variables, fitted by ordinary least squares
(:func:`numpy.polynomial.polynomial.polyfit`):

.. math::

    \text{power law:}\quad y = a\,x^{b} \iff \ln y = \ln a + b \ln x, \qquad
    \text{logarithmic:}\quad y = a + b \ln x .

The interval on ``b`` follows :mod:`ntkcv.studies._stats`: a two-sided 95% percentile bootstrap from
:func:`scipy.stats.bootstrap` with a fixed seed. Its units are the ``groups`` when given (a label per point,
say the seed: whole groups are resampled with replacement, so points that share a seed stay together) and
otherwise the points themselves (the pairs bootstrap). A resample with one group counted ``k`` times is the
fit with every point of that group weighted ``k``, which is how the resamples are fitted, all at once.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Literal

import numpy as np
from numpy.polynomial import polynomial
from scipy import stats

from ntkcv.studies._stats import CONFIDENCE, RESAMPLES, SEED, Estimate

ArrayLike = Sequence[float] | np.ndarray


@dataclasses.dataclass(frozen=True)
class PowerLawFit:
    r"""The fit :math:`y \approx a\,x^{b}` with ``prefactor`` :math:`a` and ``exponent`` :math:`b`.

    ``exponent.n`` is the number of bootstrap units (groups, or points without groups); ``n_points`` the number of
    points fitted. ``r_squared`` is :math:`R^2` of :math:`\ln y` on :math:`\ln x` and ``residual_std`` the
    standard error of that regression, :math:`\sqrt{\sum_i r_i^2 / (n - 2)}` with :math:`r_i` the residuals of
    :math:`\ln y` (NaN for two points), so it reads as a typical relative deviation from the law.
    """

    exponent: Estimate
    prefactor: float
    r_squared: float
    residual_std: float
    n_points: int

    def predict(self, x: ArrayLike) -> np.ndarray:
        r""":math:`a\,x^{b}` at ``x``."""
        return self.prefactor * np.asarray(x, np.float64) ** self.exponent.value


@dataclasses.dataclass(frozen=True)
class LogFit:
    r"""The fit :math:`y \approx a + b \ln x` with ``intercept`` :math:`a` and ``slope`` :math:`b`.

    ``slope.n`` is the number of bootstrap units, ``n_points`` the number of points fitted; ``r_squared`` is
    :math:`R^2` of :math:`y` on :math:`\ln x` and ``residual_std`` :math:`\sqrt{\sum_i r_i^2 / (n - 2)}` in
    units of ``y`` (NaN for two points).
    """

    slope: Estimate
    intercept: float
    r_squared: float
    residual_std: float
    n_points: int

    def predict(self, x: ArrayLike) -> np.ndarray:
        r""":math:`a + b \ln x` at ``x``."""
        return self.intercept + self.slope.value * np.log(np.asarray(x, np.float64))


def fit_power_law(x: ArrayLike, y: ArrayLike, *, groups: Sequence[Hashable] | np.ndarray | None = None
                  ) -> PowerLawFit:
    r"""Fit :math:`y \approx a\,x^{b}` by least squares of :math:`\ln y` on :math:`\ln x`.

    Points with a non-finite ``x`` or ``y``, ``x <= 0`` or ``y <= 0`` are dropped (no logarithm).

    Args:
        x: the control variable (width, depth, data size, time), shape ``(n,)``.
        y: the measured quantity, shape ``(n,)``.
        groups: optional label per point, shape ``(n,)``: the units the bootstrap resamples (e.g. the seed).
            Without it the points are resampled.

    Returns:
        The fit; the interval on the exponent is NaN with a single group (without groups: fewer than three
        points). Resamples whose points all share one ``x`` have no slope and are left out of the percentiles.

    Raises:
        ValueError: the arrays' shapes differ, or fewer than two distinct ``x`` remain after dropping.

    Example:
        >>> fit = fit_power_law([1.0, 4.0, 16.0], [3.0, 1.5, 0.75])
        >>> round(fit.exponent.value, 6), round(fit.prefactor, 6)
        (-0.5, 3.0)
    """
    x, y, labels = _validate(x, y, groups)
    keep = _usable("fit_power_law", x, y, positive_y=True)
    slope, intercept, r_squared, residual_std = _line(np.log(x[keep]), np.log(y[keep]), _units(labels, keep))
    return PowerLawFit(slope, math.exp(intercept), r_squared, residual_std, int(keep.sum()))


def fit_logarithmic(x: ArrayLike, y: ArrayLike, *, groups: Sequence[Hashable] | np.ndarray | None = None
                    ) -> LogFit:
    r"""Fit :math:`y \approx a + b \ln x` by least squares of :math:`y` on :math:`\ln x`.

    Points with a non-finite ``x`` or ``y`` or with ``x <= 0`` are dropped; ``y`` may have any sign. Arguments,
    interval and errors as in :func:`fit_power_law`, with the slope :math:`b` in place of the exponent.

    Example:
        >>> fit = fit_logarithmic([1.0, math.e, math.e**2], [2.0, 2.7, 3.4])
        >>> round(fit.slope.value, 6), round(fit.intercept, 6)
        (0.7, 2.0)
    """
    x, y, labels = _validate(x, y, groups)
    keep = _usable("fit_logarithmic", x, y, positive_y=False)
    slope, intercept, r_squared, residual_std = _line(np.log(x[keep]), y[keep], _units(labels, keep))
    return LogFit(slope, intercept, r_squared, residual_std, int(keep.sum()))


@dataclasses.dataclass(frozen=True)
class FitComparison:
    r"""Both laws fitted to the same points, each judged by its :math:`R^2` in ``y`` itself:

    .. math::

        R^2_{\rm lin} = 1 - \frac{\sum_i (y_i - \hat y_i)^2}{\sum_i (y_i - \bar y)^2}.

    Both laws have two parameters, so with Gaussian errors in ``y`` the larger :math:`R^2_{\rm lin}` is also
    the smaller AIC. The power law is fitted in log space, not to minimise the squared error in ``y``, so the
    comparison slightly favours the logarithm; a clear preference still says which family bends the right way.
    """

    power_law: PowerLawFit
    logarithmic: LogFit
    power_law_r_squared: float
    logarithmic_r_squared: float

    @property
    def better(self) -> Literal["power law", "logarithmic"]:
        """The family with the larger :math:`R^2` in ``y`` (the power law on a tie)."""
        return "logarithmic" if self.logarithmic_r_squared > self.power_law_r_squared else "power law"


def compare_fits(x: ArrayLike, y: ArrayLike, *, groups: Sequence[Hashable] | np.ndarray | None = None
                 ) -> FitComparison:
    """Fit a power law and a logarithm to the points where both are defined (finite, ``x > 0``, ``y > 0``) and
    compare them by :math:`R^2` in ``y`` (see :class:`FitComparison`). Errors as in :func:`fit_power_law`."""
    x, y, labels = _validate(x, y, groups)
    keep = _usable("compare_fits", x, y, positive_y=True)
    x, y = x[keep], y[keep]
    labels = None if labels is None else labels[keep]
    power, log = fit_power_law(x, y, groups=labels), fit_logarithmic(x, y, groups=labels)
    return FitComparison(power, log, _r_squared(y, power.predict(x)), _r_squared(y, log.predict(x)))


def exponent_claim(fit: PowerLawFit | LogFit, predictions: Mapping[str, float]) -> str:
    """A plain sentence for a :class:`~ntkcv.studies._findings.Claim`: the fitted exponent (a power law's
    :math:`b`, a logarithm's slope) with its interval, which ``predictions`` (name → predicted value) the interval
    contains (up to rounding, a relative 1e-9) and which it excludes, and the closest prediction.

    Example:
        >>> fit = fit_power_law([1.0, 4.0, 16.0], [3.0, 1.5, 0.75])
        >>> exponent_claim(fit, {"NTK theory": -0.5, "mean field": -1.0}).split("; ")[1]
        'it contains NTK theory (-0.500) and excludes mean field (-1.000)'
    """
    if not predictions:
        raise ValueError("predictions must name at least one predicted value, got none")
    estimate, name = (fit.exponent, "exponent") if isinstance(fit, PowerLawFit) else (fit.slope, "slope of ln x")
    counted = f"{estimate.n} {'point' if estimate.n == fit.n_points else 'group'}{'s' * (estimate.n != 1)}"
    closest = min(predictions, key=lambda label: abs(predictions[label] - estimate.value))
    if math.isnan(estimate.low):
        return (f"{name} = {estimate.value:+.3f} (no interval from {counted}); closest prediction: {closest} "
                f"({predictions[closest]:+.3f}).")

    def listed(labels: list[str]) -> str:
        return ", ".join(f"{label} ({predictions[label]:+.3f})" for label in labels)

    slack = 1e-9 * max(1.0, abs(estimate.low), abs(estimate.high))
    inside = [label for label, value in predictions.items() if estimate.low - slack <= value <= estimate.high + slack]
    outside = [label for label in predictions if label not in inside]
    if not inside:
        verdict = f"it excludes all of {listed(outside)}"
    else:
        verdict = f"it contains {listed(inside)}" + (f" and excludes {listed(outside)}" if outside else "")
    return f"{name} = {estimate} ({CONFIDENCE:.0%} interval over {counted}); {verdict}; closest: {closest}."


def _validate(x: ArrayLike, y: ArrayLike, groups: Sequence[Hashable] | np.ndarray | None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"x and y must be 1-D of the same length, got shapes {x.shape} and {y.shape}")
    if groups is None:
        return x, y, None
    labels = np.asarray(groups)
    if labels.shape != x.shape:
        raise ValueError(f"groups must give one label per point, shape {x.shape}, got shape {labels.shape}")
    return x, y, labels


def _usable(caller: str, x: np.ndarray, y: np.ndarray, *, positive_y: bool) -> np.ndarray:
    """The mask of points with finite ``x > 0`` and finite ``y`` (``y > 0`` if ``positive_y``); a ``ValueError``
    that counts what was dropped when fewer than two distinct ``x`` remain."""
    finite = np.isfinite(x) & np.isfinite(y)
    keep = finite & (x > 0) & ((y > 0) if positive_y else True)
    distinct = np.unique(x[keep]).size
    if distinct < 2:
        dropped = [f"{int(np.sum(~finite))} non-finite", f"{int(np.sum(finite & (x <= 0)))} with x <= 0"]
        if positive_y:
            dropped.append(f"{int(np.sum(finite & (x > 0) & (y <= 0)))} with y <= 0")
        raise ValueError(f"{caller} needs at least 2 distinct x among the usable points, got {distinct}: "
                         f"{int(keep.sum())} of {x.size} points usable ({', '.join(dropped)} dropped)")
    return keep


def _units(labels: np.ndarray | None, keep: np.ndarray) -> np.ndarray:
    """The bootstrap unit of each kept point as an index ``0..G-1``: its group, or the point itself."""
    if labels is None:
        return np.arange(int(keep.sum()))
    return np.unique(labels[keep], return_inverse=True)[1].ravel()


def _line(u: np.ndarray, v: np.ndarray, units: np.ndarray) -> tuple[Estimate, float, float, float]:
    """Least squares ``v ≈ c + b u``: ``b`` with its bootstrap interval over ``units``, ``c``, R² and the residual
    standard error."""
    intercept, slope = polynomial.polyfit(u, v, 1)
    residuals = v - (intercept + slope * u)
    n, n_units = u.size, int(units.max()) + 1
    residual_std = math.sqrt(float(residuals @ residuals) / (n - 2)) if n > 2 else math.nan
    r_squared = _r_squared(v, intercept + slope * u)
    if n_units < 2 or n_units == n == 2:  # one group, or two points that any line fits exactly
        return Estimate(float(slope), math.nan, math.nan, n_units), float(intercept), r_squared, residual_std
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)  # a NaN resample; recomputed below
        result = stats.bootstrap((np.arange(n_units),), _resampled_slopes(u, v, units), vectorized=True,
                                 batch=max(1, 2**20 // n),  # resamples × points per chunk: a few MB
                                 confidence_level=CONFIDENCE, n_resamples=RESAMPLES, method="percentile",
                                 rng=np.random.default_rng(SEED))
    low, high = result.confidence_interval
    if math.isnan(low) or math.isnan(high):  # leave out the resamples without a slope (all at one x)
        alpha = (1 - CONFIDENCE) / 2
        low, high = stats.quantile(result.bootstrap_distribution, [alpha, 1 - alpha], nan_policy="omit")
    return Estimate(float(slope), float(low), float(high), n_units), float(intercept), r_squared, residual_std


def _resampled_slopes(u: np.ndarray, v: np.ndarray, units: np.ndarray) -> Callable[..., np.ndarray]:
    """The statistic for :func:`scipy.stats.bootstrap`: resampled unit indices ``(..., G)`` → least-squares slopes
    ``(...)``, each resample fitted as the weighted fit with each point weighted by how often its unit was drawn.
    NaN where the drawn points share one ``u``."""
    n_units = int(units.max()) + 1

    def statistic(drawn: np.ndarray, axis: int = -1) -> np.ndarray:
        drawn = np.moveaxis(drawn, axis, -1)
        batch = drawn.shape[:-1]
        drawn = drawn.reshape(-1, n_units)
        rows = np.arange(drawn.shape[0])[:, None]
        counts = np.bincount((drawn + n_units * rows).ravel(), minlength=drawn.size).reshape(drawn.shape)
        w = counts[:, units].astype(np.float64)
        total = w.sum(-1, keepdims=True)
        du = u - (w @ u)[:, None] / total
        dv = v - (w @ v)[:, None] / total
        spread = np.where(w > 0, u, -np.inf).max(-1) > np.where(w > 0, u, np.inf).min(-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            slopes = np.where(spread, (w * du * dv).sum(-1) / (w * du * du).sum(-1), np.nan)
        return slopes.reshape(batch)

    return statistic


def _r_squared(observed: np.ndarray, predicted: np.ndarray) -> float:
    """:math:`1 - SS_{res}/SS_{tot}`; NaN when ``observed`` is constant."""
    total = float(np.sum((observed - observed.mean()) ** 2))
    if total == 0:
        return math.nan
    return 1 - float(np.sum((observed - predicted) ** 2)) / total
