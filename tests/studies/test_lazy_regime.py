"""The lazy-regime study on runs with known answers: per-run summaries, regimes, fitted exponents and verdicts."""

import math

import numpy as np
import pytest

from ntkcv.studies import lazy_regime
from tests.studies.rows import row

WIDTHS = (64, 128, 256, 512, 1024)


def run(width, seed, *, parameterization, optimizer, learning_rate, change, eta_lambda, status="complete"):
    return row(widths=(width, width), seed=seed, loss="mse", optimizer=optimizer, learning_rate=learning_rate,
               status=status, config__model__parameterization=parameterization, config__model__activation="tanh",
               relative_distance__final=change, eta_lambda=eta_lambda, initial_sharpness=2.0,
               final_sharpness=1.0 if eta_lambda > 2 else 2.0, loss_peak=1.5 if eta_lambda > 2 else 1.0,
               train__loss__final=0.01)


def arms_rows():
    """Lazy: Δ = 3/w; catapult: Δ = 0.2 w^0.1; Adam: Δ = w^(−0.2); each seed scaled by its own factor, so every
    seed has exactly the arm's exponent."""
    rows = []
    for seed in range(3):
        factor = 1 + 0.1 * seed
        for w in WIDTHS:
            rows += [run(w, seed, parameterization="ntk", optimizer="sgd", learning_rate=0.5, change=factor * 3 / w,
                         eta_lambda=1.0),
                     run(w, seed, parameterization="ntk", optimizer="sgd", learning_rate=1.5,
                         change=factor * 0.2 * w**0.1, eta_lambda=3.0),
                     run(w, seed, parameterization="standard", optimizer="adam", learning_rate=1e-3,
                         change=factor * w**-0.2, eta_lambda=math.nan)]
    return rows


def test_summary_of_a_run():
    series = {"curvature/ggn_max": (np.array([0, 299]), np.array([2.0, 1.2])),
              "train/loss": (np.arange(4), np.array([1.0, 3.0, np.nan, 0.5]))}
    summary = lazy_regime.summarise(series, 1.5)
    assert summary == {"initial_sharpness": 2.0, "final_sharpness": 1.2, "eta_lambda": 3.0, "loss_peak": 3.0}
    assert math.isnan(lazy_regime.summarise(series, None)["eta_lambda"])  # not gradient descent
    assert all(math.isnan(value) for value in lazy_regime.summarise({}, 0.1).values())


@pytest.mark.parametrize("eta_lambda, diverged, expected", [
    (1.99, False, "lazy"), (2.0, False, "catapult"), (6.0, False, "catapult"), (math.nan, False, "adaptive"),
    (1.0, True, "divergent"), (math.nan, True, "divergent")])
def test_regime_from_the_step_size_times_the_initial_sharpness(eta_lambda, diverged, expected):
    assert lazy_regime.regime(eta_lambda, diverged=diverged) == expected
    assert (lazy_regime.catapult_limit("relu"), lazy_regime.catapult_limit("tanh")) == (12.0, 4.0)


def test_exponents_and_verdicts_of_three_arms():
    findings = lazy_regime.analyse(arms_rows())
    lazy, catapult, adam = findings.values["arms"]
    assert (lazy["regime"], catapult["regime"], adam["regime"]) == ("lazy", "catapult", "adaptive")
    for arm, exponent in ((lazy, -1.0), (catapult, 0.1), (adam, -0.2)):
        assert arm["fit"].exponent.value == pytest.approx(exponent)
        assert arm["fit"].exponent.low == pytest.approx(exponent) == arm["fit"].exponent.high  # every seed agrees
        assert arm["fit"].n_points == 15 and arm["fit"].exponent.n == 3
        assert arm["fit_narrower"].exponent.value == pytest.approx(exponent) and arm["fit_narrower"].n_points == 12
    widest = lazy["widths"][-1]
    assert widest["width"] == 1024 and widest["seeds"] == 3 and widest["regimes"] == {"lazy": 3}
    assert widest["kernel_change"].value == pytest.approx(np.mean([1.0, 1.1, 1.2]) * 3 / 1024)
    assert catapult["widths"][0]["sharpness_ratio"] == 0.5 and catapult["widths"][0]["loss_peak"] == 1.5
    _, rate, catapulted, _ = findings.claims
    assert [c.verdict for c in findings.claims] == ["reproduced"] * 4
    assert "contains Dyer & Gur-Ari 2019 (-1.000)" in rate.evidence
    assert "excludes Lee et al. 2019 bound (-0.500)" in rate.evidence
    assert "Without width 1024: exponent b = -1.000 [-1.000, -1.000]." in rate.evidence
    assert any("resample 3 seeds" in note for note in findings.notes)
    assert "mean λ_T/λ₀ = 0.500" in catapulted.evidence
    text = findings.markdown()
    assert "| ntk + sgd(η = 0.5) | 1024 | 3 | 1.00 | lazy 3 |" in text


def test_arms_that_contradict_the_predictions_and_runs_that_left_their_regime():
    rows = [r for r in arms_rows() if r["config.optimizer.learning_rate"] != 1e-3]
    for r in rows:  # the lazy arm's change rising slowly with width, the catapult arm's falling as 1/w
        w = json_width(r)
        if r["config.optimizer.learning_rate"] == 0.5:
            r["relative_distance.final"] = 0.01 * w**0.05 * (1 + 0.1 * r["config.train.seed"])
        else:
            r["relative_distance.final"] = (1 + 0.1 * r["config.train.seed"]) / w
    rows[0]["eta_lambda"] = 2.5  # width 64, seed 0 of the lazy arm catapulted
    rows[1]["eta_lambda"] = 4.5  # width 64, seed 0 of the catapult arm: above the predicted limit, and converged
    rows.append(run(64, 3, parameterization="ntk", optimizer="sgd", learning_rate=1.5, change=math.nan,
                    eta_lambda=5.0, status="diverged"))
    rows.append({"run_id": "broken", "status": "failed", "relative_distance.final": math.nan, "eta_lambda": math.nan})
    findings = lazy_regime.analyse(rows)
    vanishing, rate, catapulted, adaptive = findings.claims
    assert (vanishing.verdict, rate.verdict, catapulted.verdict, adaptive.verdict) == (
        "not reproduced", "not reproduced", "not reproduced", "inconclusive")
    lazy, catapult = findings.values["arms"]
    assert lazy["regime"] == "lazy" and catapult["widths"][0]["regimes"] == {"catapult": 3, "divergent": 1}
    assert catapult["fit"].n_points == 15  # the diverged run has no kernel change
    assert any("width 64 seed 0 was catapult (ηλ₀ = 2.50)" in note for note in findings.notes)
    assert any("1 run converged above the predicted limit ηλ₀ ≈ 4 (width 64 seed 0: ηλ₀ = 4.50)" in note
               for note in findings.notes)
    assert any("1 runs failed" in note for note in findings.notes)


def test_rows_without_the_curvature_summary_are_refused():
    rows = [{k: v for k, v in r.items() if k != "eta_lambda"} for r in arms_rows()]
    with pytest.raises(ValueError, match="annotate the rows first"):
        lazy_regime.analyse(rows)


def test_figure(tmp_path):
    (path,) = lazy_regime.figures(arms_rows(), tmp_path)
    assert path.name == "lazy_regime.png" and path.stat().st_size > 5000


def json_width(r):
    return int(r["config.model.widths"].strip("[]").split(",")[0])
