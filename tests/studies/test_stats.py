"""The studies' statistics: bootstrap intervals of a mean and of Spearman's ρ, against closed forms and scipy."""

import math

import numpy as np
import pytest
from scipy import stats

from ntkcv.studies import Estimate, mean_ci, spearman_ci
from ntkcv.studies._findings import sign_claim, verdict


def test_mean_ci_brackets_the_mean_and_shrinks_with_more_values():
    rng = np.random.default_rng(0)
    few, many = rng.normal(1.0, 1.0, 10), rng.normal(1.0, 1.0, 1000)
    small, large = mean_ci(few), mean_ci(many)
    assert small.low < small.value < small.high and large.low < large.value < large.high
    assert small.value == pytest.approx(few.mean()) and small.n == 10
    assert large.high - large.low < (small.high - small.low) / 5
    # the normal-theory interval of 1000 values: ±1.96 σ/√n
    assert large.high - large.low == pytest.approx(2 * 1.96 * many.std() / math.sqrt(1000), rel=0.15)
    assert large.sign == 1 and large.excludes_zero


def test_mean_ci_edge_cases():
    assert math.isnan(mean_ci([]).value)
    one = mean_ci([0.5, np.nan])
    assert one.value == 0.5 and one.n == 1 and math.isnan(one.low) and one.sign == 0
    same = mean_ci([0.2, 0.2, 0.2])
    assert (same.low, same.high) == pytest.approx((0.2, 0.2))
    straddles = mean_ci([-1.0, 1.0, -0.5, 0.5])
    assert straddles.sign == 0 and not straddles.excludes_zero


def test_spearman_ci_matches_scipy_and_bounds_a_monotone_relation():
    rng = np.random.default_rng(1)
    x = rng.normal(size=40)
    y = x + rng.normal(size=40)
    rho = spearman_ci(x, y)
    assert rho.value == pytest.approx(stats.spearmanr(x, y).statistic)
    assert rho.low < rho.value < rho.high and rho.n == 40
    monotone = spearman_ci(x, np.exp(x))
    assert (monotone.value, monotone.low, monotone.high) == pytest.approx((1.0, 1.0, 1.0))
    assert spearman_ci(x, -(x**3)).value == pytest.approx(-1.0)


def test_spearman_ci_drops_non_finite_pairs_and_needs_three():
    rho = spearman_ci([1.0, 2.0, np.nan, 3.0, 4.0], [1.0, 2.0, 5.0, np.inf, 3.0])
    assert rho.n == 3 and rho.value == pytest.approx(stats.spearmanr([1, 2, 4], [1, 2, 3]).statistic)
    assert math.isnan(spearman_ci([1.0, 2.0], [2.0, 1.0]).value)
    assert math.isnan(spearman_ci([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]).value)
    with pytest.raises(ValueError, match="same length"):
        spearman_ci([1.0, 2.0, 3.0], [1.0, 2.0])


def test_estimate_formatting_and_claims():
    assert str(Estimate(0.25, 0.1, 0.4, 5)) == "+0.250 [+0.100, +0.400]"
    assert str(Estimate(math.nan, math.nan, math.nan, 0)) == "n/a"
    assert [verdict(2, 2), verdict(1, 2), verdict(0, 2), verdict(0, 0)] == [
        "reproduced", "partly reproduced", "not reproduced", "inconclusive"]
    claim = sign_claim("X grows.", [("a", Estimate(1, 0.5, 2, 9)), ("b", Estimate(-1, -2, -0.5, 9)),
                                    ("c", Estimate(1, math.nan, math.nan, 1))], expected=1, quantity="Δ")
    assert claim.verdict == "partly reproduced"
    assert "1 of 2 sizes" in claim.evidence and "significantly negative at b" in claim.evidence
    assert "1 sizes too small" in claim.evidence
