"""Scaling-law fits: closed forms, scipy.stats.linregress on the logs, and the coverage of the bootstrap intervals."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.polynomial import polynomial
from scipy import stats

from ntkcv.studies._stats import Estimate
from ntkcv.studies.fit import (
    LogFit,
    PowerLawFit,
    compare_fits,
    exponent_claim,
    fit_logarithmic,
    fit_power_law,
)
from ntkcv.studies.fit import _resampled_slopes as resampled_slopes

WIDTHS = np.array([8.0, 16.0, 32.0, 64.0, 128.0, 256.0])


def _seeded_power_law(rng: np.random.Generator, *, exponent: float, seeds: int, noise: float = 0.1):
    """``2 · width^exponent`` with a log-normal offset per seed and log-normal noise per point."""
    x = np.tile(WIDTHS, seeds)
    groups = np.repeat([f"seed{i}" for i in range(seeds)], WIDTHS.size)
    offsets = np.repeat(rng.normal(0.0, 0.05, seeds), WIDTHS.size)
    y = 2.0 * x**exponent * np.exp(offsets + rng.normal(0.0, noise, x.size))
    return x, y, groups


def test_exact_power_law_recovers_exponent_and_prefactor():
    x = np.geomspace(1.0, 1e4, 9)
    fit = fit_power_law(x, 3.0 * x**-0.5)
    assert isinstance(fit, PowerLawFit) and fit.n_points == 9 and fit.exponent.n == 9
    assert fit.exponent.value == pytest.approx(-0.5, abs=1e-10)
    assert fit.prefactor == pytest.approx(3.0, rel=1e-10)
    assert fit.r_squared == pytest.approx(1.0, abs=1e-12) and fit.residual_std == pytest.approx(0.0, abs=1e-12)
    assert (fit.exponent.low, fit.exponent.high) == pytest.approx((-0.5, -0.5), abs=1e-10)
    np.testing.assert_allclose(fit.predict([2.0, 100.0]), 3.0 * np.array([2.0, 100.0]) ** -0.5, rtol=1e-10)


def test_grouped_interval_covers_the_true_exponent_and_matches_linregress():
    truth, covered = -0.75, 0
    for repetition in range(40):
        x, y, groups = _seeded_power_law(np.random.default_rng(repetition), exponent=truth, seeds=10)
        fit = fit_power_law(x, y, groups=groups)
        reference = stats.linregress(np.log(x), np.log(y))
        assert fit.exponent.value == pytest.approx(reference.slope, rel=1e-10)
        assert fit.prefactor == pytest.approx(math.exp(reference.intercept), rel=1e-10)
        assert fit.r_squared == pytest.approx(reference.rvalue**2, rel=1e-10)
        assert fit.exponent.n == 10 and fit.n_points == 60
        assert fit.exponent.low < fit.exponent.value < fit.exponent.high
        assert not fit.exponent.low <= -0.5 <= fit.exponent.high  # a clearly wrong exponent is excluded
        covered += fit.exponent.low <= truth <= fit.exponent.high
    assert covered >= 34  # ≥ 85% of 40 nominal-95% intervals


def test_pairs_bootstrap_width_matches_normal_theory():
    rng = np.random.default_rng(7)
    x = np.geomspace(1.0, 1e3, 60)
    y = 0.5 * x**1.2 * np.exp(rng.normal(0.0, 0.2, x.size))
    fit = fit_power_law(x, y)
    reference = stats.linregress(np.log(x), np.log(y))
    assert fit.exponent.n == 60 and fit.exponent.low < fit.exponent.value < fit.exponent.high
    assert fit.exponent.high - fit.exponent.low == pytest.approx(2 * 1.96 * reference.stderr, rel=0.25)
    residuals = np.log(y) - (reference.intercept + reference.slope * np.log(x))
    assert fit.residual_std == pytest.approx(np.sqrt(residuals @ residuals / (x.size - 2)), rel=1e-10)


def test_resampled_slopes_are_fits_of_the_drawn_groups():
    rng = np.random.default_rng(3)
    u = np.array([0.0, 1.0, 2.0, 0.5, 1.5, 3.0, 3.0])
    v = rng.normal(size=u.size)
    units = np.array([0, 0, 0, 1, 1, 2, 2])  # group 2 has a single u
    drawn = np.array([[0, 1, 2], [1, 1, 0], [2, 2, 0], [2, 2, 2], [0, 0, 0]])
    slopes = resampled_slopes(u, v, units)(drawn)
    for row, slope in zip(drawn, slopes, strict=True):
        points = np.concatenate([np.flatnonzero(units == unit) for unit in row])
        if np.ptp(u[points]) == 0:
            assert math.isnan(slope)
        else:
            assert slope == pytest.approx(polynomial.polyfit(u[points], v[points], 1)[1], rel=1e-10)
    assert math.isnan(slopes[3]) and not math.isnan(slopes[4])


def test_one_group_or_two_points_have_no_interval():
    x, y, _ = _seeded_power_law(np.random.default_rng(0), exponent=-1.0, seeds=3)
    one = fit_power_law(x, y, groups=["only"] * x.size)
    assert one.exponent.n == 1 and math.isnan(one.exponent.low) and math.isnan(one.exponent.high)
    assert one.exponent.value == pytest.approx(stats.linregress(np.log(x), np.log(y)).slope)
    two = fit_power_law([1.0, 4.0], [1.0, 0.5])
    assert two.exponent.value == pytest.approx(-0.5) and math.isnan(two.exponent.low) and two.exponent.n == 2
    assert math.isnan(two.residual_std)


def test_exact_logarithm():
    x = np.geomspace(0.5, 1e4, 11)
    fit = fit_logarithmic(x, 2.0 + 0.7 * np.log(x))
    assert isinstance(fit, LogFit) and fit.n_points == 11
    assert fit.slope.value == pytest.approx(0.7, abs=1e-10) and fit.intercept == pytest.approx(2.0, abs=1e-10)
    assert fit.r_squared == pytest.approx(1.0, abs=1e-12)
    assert (fit.slope.low, fit.slope.high) == pytest.approx((0.7, 0.7), abs=1e-10)
    np.testing.assert_allclose(fit.predict([3.0]), [2.0 + 0.7 * math.log(3.0)], rtol=1e-12)


def test_compare_fits_picks_the_family_of_clean_data():
    x = np.geomspace(1.0, 1e3, 12)
    for y in (3.0 * x**-0.5, 0.5 * x**1.5):
        comparison = compare_fits(x, y)
        assert comparison.better == "power law"
        assert comparison.power_law_r_squared == pytest.approx(1.0) and comparison.logarithmic_r_squared < 0.99
    comparison = compare_fits(x, 2.0 + 0.7 * np.log(x))
    assert comparison.better == "logarithmic" and comparison.logarithmic_r_squared == pytest.approx(1.0)
    assert comparison.logarithmic.slope.value == pytest.approx(0.7)


def test_unusable_points_are_dropped():
    x = np.array([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, -1.0])
    y = 3.0 * np.abs(x) ** -0.5
    y[1], y[3], y[4] = -1.0, 0.0, np.nan
    fit = fit_power_law(x, y)
    assert fit.n_points == 3 and fit.exponent.value == pytest.approx(-0.5) and fit.prefactor == pytest.approx(3.0)
    log = fit_logarithmic(x, np.where(np.isfinite(y), np.log(np.abs(x)) - 5.0, np.nan))  # negative y are fine
    assert log.n_points == 5 and log.slope.value == pytest.approx(1.0) and log.intercept == pytest.approx(-5.0)


def test_bad_input_raises_with_the_problem():
    with pytest.raises(ValueError, match=r"at least 2 distinct x.*got 1: 1 of 3 points usable.*2 with y <= 0"):
        fit_power_law([1.0, 2.0, 3.0], [1.0, -1.0, 0.0])
    with pytest.raises(ValueError, match="at least 2 distinct x among the usable points, got 1:"):
        fit_logarithmic([2.0, 2.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="1 non-finite, 1 with x <= 0"):
        compare_fits([1.0, np.nan, -2.0], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="same length"):
        fit_power_law([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="one label per point"):
        fit_logarithmic([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], groups=[0, 1])
    with pytest.raises(ValueError, match="at least one predicted value"):
        exponent_claim(fit_power_law([1.0, 2.0, 4.0], [1.0, 2.0, 4.0]), {})


def test_exponent_claim_names_the_predictions_inside_and_outside():
    fit = PowerLawFit(Estimate(-0.52, -0.6, -0.45, 8), prefactor=2.0, r_squared=0.99, residual_std=0.1, n_points=48)
    predictions = {"Lee et al. 2019 bound −1/2": -0.5, "Dyer & Gur-Ari 2019: −1": -1.0}
    sentence = exponent_claim(fit, predictions)
    assert sentence.startswith("exponent = -0.520 [-0.600, -0.450] (95% interval over 8 groups); ")
    assert "it contains Lee et al. 2019 bound −1/2 (-0.500) and excludes Dyer & Gur-Ari 2019: −1 (-1.000)" in sentence
    assert sentence.endswith("closest: Lee et al. 2019 bound −1/2.")
    assert "it excludes all of A (+0.000), B (-2.000); closest: A." in exponent_claim(fit, {"A": 0.0, "B": -2.0})
    x, y, _ = _seeded_power_law(np.random.default_rng(1), exponent=-0.5, seeds=3)
    single = fit_power_law(x, y, groups=["one"] * x.size)
    assert exponent_claim(single, predictions).startswith(
        f"exponent = {single.exponent.value:+.3f} (no interval from 1 group); closest prediction: Lee")
    log = fit_logarithmic(np.geomspace(1.0, 100.0, 5), 1.0 + 0.7 * np.log(np.geomspace(1.0, 100.0, 5)))
    assert exponent_claim(log, {"theory": 0.7}).startswith("slope of ln x = +0.700 [+0.700, +0.700] (95% interval "
                                                             "over 5 points); it contains theory (+0.700); ")


@settings(max_examples=40, deadline=None)
@given(exponent=st.floats(-3.0, 3.0), prefactor=st.floats(1e-3, 1e3))
def test_power_law_property(exponent, prefactor):
    x = np.geomspace(1.0, 1e3, 7)
    fit = fit_power_law(x, prefactor * x**exponent)
    assert fit.exponent.value == pytest.approx(exponent, abs=1e-8)
    assert fit.prefactor == pytest.approx(prefactor, rel=1e-8)


def test_few_points_leave_out_resamples_at_one_x():
    # 5 points: about 0.16% of pairs resamples draw one x five times (no slope); they are left out, not NaN-ing all
    x = np.array([1.0, 2.0, 4.0, 8.0, 16.0])
    fit = fit_power_law(x, x**-1.0 * np.array([1.1, 0.9, 1.05, 0.95, 1.0]))
    assert fit.exponent.n == 5 and fit.exponent.low < fit.exponent.value < fit.exponent.high
