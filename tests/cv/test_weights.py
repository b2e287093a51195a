import warnings

import numpy as np
import pytest

import ntkcv.cv as cv


def pareto(alpha, n, seed, xmin=0.5):
    """Samples with density ∝ x^-alpha on [xmin, ∞)."""
    return xmin * np.random.default_rng(seed).random(n) ** (-1.0 / (alpha - 1.0))


@pytest.mark.parametrize("alpha", [2.0, 3.0, 4.5])
def test_alpha_recovered_from_pareto_samples(alpha):
    fit = cv.fit_power_law(pareto(alpha, 2000, seed=int(alpha * 10)))
    assert abs(fit.alpha - alpha) < 0.1
    assert fit.alpha_stderr == pytest.approx((fit.alpha - 1) / np.sqrt(fit.num_tail))


@pytest.mark.parametrize("alpha", [2.5, 3.5])
def test_agrees_with_powerlaw_package(alpha):
    powerlaw = pytest.importorskip("powerlaw")
    data = np.concatenate(
        [pareto(alpha, 500, seed=7), 0.5 * np.random.default_rng(8).random(100)]
    )  # + a body
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = powerlaw.Fit(data, verbose=0, parameter_ranges={"alpha": [1.0, 20.0]})
    fit = cv.fit_power_law(data)
    assert fit.xmin == pytest.approx(reference.xmin)
    assert fit.alpha == pytest.approx(reference.alpha, rel=1e-6)
    assert fit.ks_distance == pytest.approx(reference.D, rel=1e-6)


def test_layer_eigenvalues_pool_conv_slices():
    kernel = np.random.default_rng(0).normal(size=(3, 3, 16, 40))
    expected = np.concatenate(
        [np.linalg.svd(kernel[i, j], compute_uv=False) ** 2 / 40 for i in range(3) for j in range(3)]
    )
    np.testing.assert_allclose(cv.layer_eigenvalues(kernel), np.sort(expected)[::-1], rtol=1e-10)
    dense = np.random.default_rng(1).normal(size=(30, 20))
    np.testing.assert_allclose(
        cv.layer_eigenvalues(dense), np.linalg.eigvalsh(dense.T @ dense / 30)[::-1], rtol=1e-10
    )


def test_weight_spectra_of_a_params_tree():
    rng = np.random.default_rng(0)
    params = {
        "params": {
            "Conv_0": {"kernel": rng.normal(size=(3, 3, 8, 16)), "bias": np.zeros(16)},
            "Dense_0": {"kernel": rng.standard_t(3, size=(200, 100))},
            "Dense_1": {"kernel": rng.normal(size=(100, 4))},
        }
    }
    result = cv.weight_spectra(params)
    assert set(result.layers) == {"params/Conv_0/kernel", "params/Dense_0/kernel"}
    assert "4 non-zero eigenvalues" in result.skipped["params/Dense_1/kernel"]
    layer = result.layers["params/Dense_0/kernel"]
    lam = np.linalg.svd(params["params"]["Dense_0"]["kernel"], compute_uv=False) ** 2 / 200
    assert layer.num_eigenvalues == 100
    assert layer.log10_spectral_norm == pytest.approx(np.log10(lam.max()))
    assert layer.log10_frobenius_norm == pytest.approx(np.log10(lam.sum()))
    assert layer.stable_rank == pytest.approx(lam.sum() / lam.max())
    assert layer.alpha_weighted == pytest.approx(layer.power_law.alpha * np.log10(lam.max()))
    p = lam / lam.sum()
    assert layer.matrix_entropy == pytest.approx(-np.sum(p * np.log(p)) / np.log(100))
    assert result.layers["params/Conv_0/kernel"].num_eigenvalues == 9 * 8
    alphas = [layer.power_law.alpha for layer in result.layers.values()]
    assert result.summary["alpha"] == pytest.approx(np.mean(alphas))


def test_fit_power_law_rejects_non_positive_values():
    with pytest.raises(ValueError, match="positive"):
        cv.fit_power_law(np.array([0.0, 1.0, 2.0]))


def test_non_finite_layers_are_skipped_with_the_reason():
    rng = np.random.default_rng(0)
    diverged = rng.normal(size=(60, 40))
    diverged[3, 5] = np.nan
    result = cv.weight_spectra({"a": {"kernel": diverged}, "b": {"kernel": rng.normal(size=(60, 40))}})
    assert set(result.layers) == {"b/kernel"}
    assert "non-finite" in result.skipped["a/kernel"]
    assert result.summary["alpha"] == pytest.approx(result.layers["b/kernel"].power_law.alpha)
