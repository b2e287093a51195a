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
    data = np.concatenate([pareto(alpha, 500, seed=7), 0.5 * np.random.default_rng(8).random(100)])  # + a body
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
    np.testing.assert_allclose(cv.layer_eigenvalues(dense), np.linalg.eigvalsh(dense.T @ dense / 30)[::-1], rtol=1e-10)


def matrix_with_singular_values(singular_values, rows, cols, seed=0):
    """``U diag(σ) Vᵀ`` of shape ``(rows, cols)`` with Haar-random orthonormal ``U``, ``V``."""
    rng = np.random.default_rng(seed)
    k = len(singular_values)
    u = np.linalg.qr(rng.normal(size=(rows, k)))[0]
    v = np.linalg.qr(rng.normal(size=(cols, k)))[0]
    return (u * np.asarray(singular_values, dtype=np.float64)) @ v.T


def test_matrix_with_singular_values_helper():
    sigma = np.linspace(3.0, 0.5, 6)
    w = matrix_with_singular_values(sigma, 9, 7)
    assert w.shape == (9, 7)
    np.testing.assert_allclose(np.linalg.svd(w, compute_uv=False)[:6], sigma, rtol=1e-12)


def test_metrics_of_a_layer_with_known_singular_values():
    sigma = np.geomspace(4.0, 0.1, 25)
    result = cv.weight_spectra({"Dense_0": {"kernel": matrix_with_singular_values(sigma, 40, 25)}})
    layer = result.layers["Dense_0"]
    lam = sigma**2 / 40
    assert (layer.kind, layer.matrix_shape, layer.num_matrices, layer.num_eigenvalues) == ("dense", (40, 25), 1, 25)
    assert layer.log10_spectral_norm == pytest.approx(np.log10(lam[0]), rel=1e-12)
    assert layer.log10_frobenius_norm == pytest.approx(np.log10(lam.sum()), rel=1e-12)
    assert layer.stable_rank == pytest.approx(lam.sum() / lam[0], rel=1e-12)
    p = lam / lam.sum()
    assert layer.matrix_entropy == pytest.approx(-np.sum(p * np.log(p)) / np.log(25), rel=1e-12)
    fit = cv.fit_power_law(lam)
    assert (layer.power_law.alpha, layer.power_law.xmin) == pytest.approx((fit.alpha, fit.xmin), rel=1e-10)
    assert layer.alpha_weighted == pytest.approx(fit.alpha * np.log10(lam[0]), rel=1e-12)


def test_attention_projections_are_one_matrix_each():
    d_in, heads, head_dim, d_out = 12, 3, 5, 20
    sigma_qkv, sigma_out = np.linspace(2.0, 0.2, 12), np.linspace(1.5, 0.1, 15)
    qkv = matrix_with_singular_values(sigma_qkv, d_in, heads * head_dim).reshape(d_in, heads, head_dim)
    out = matrix_with_singular_values(sigma_out, heads * head_dim, d_out, seed=1).reshape(heads, head_dim, d_out)
    # bias-free, so only the module layout tells these from a convolution
    params = {
        "attn": {"query": {"kernel": qkv}, "key": {"kernel": qkv}, "value": {"kernel": qkv}, "out": {"kernel": out}}
    }
    layers = cv.weight_layers(params)
    assert list(layers) == ["attn/key", "attn/out", "attn/query", "attn/value"]
    assert {layer.kind for layer in layers.values()} == {"dense_general"}
    assert layers["attn/query"].matrices.shape == (1, d_in, heads * head_dim)
    assert layers["attn/out"].matrices.shape == (1, heads * head_dim, d_out)
    np.testing.assert_allclose(
        cv.layer_eigenvalues(layers["attn/query"].matrices), sigma_qkv**2 / (heads * head_dim), rtol=1e-10
    )
    np.testing.assert_allclose(cv.layer_eigenvalues(layers["attn/out"].matrices), sigma_out**2 / d_out, rtol=1e-10)
    result = cv.weight_spectra(params)
    assert result.layers["attn/query"].num_eigenvalues == 12  # not d_in slices of (heads, head_dim)
    assert result.layers["attn/out"].log10_frobenius_norm == pytest.approx(np.log10(np.sum(sigma_out**2) / d_out))


def test_rank_3_kernels_outside_attention():
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(3, 6, 8))
    layers = cv.weight_layers(
        {
            "out": {"kernel": kernel, "bias": np.zeros(8)},  # a Conv1D that happens to be named "out"
            "proj": {"kernel": kernel, "bias": np.zeros((6, 8))},  # DenseGeneral(features=(6, 8))
            "DenseGeneral_0": {"kernel": kernel, "bias": np.zeros(8)},  # DenseGeneral(8, axis=(-2, -1))
        }
    )
    assert layers["out"].kind == "conv"
    np.testing.assert_array_equal(layers["out"].matrices, kernel)
    assert (layers["proj"].kind, layers["proj"].matrices.shape) == ("dense_general", (1, 3, 48))
    assert (layers["DenseGeneral_0"].kind, layers["DenseGeneral_0"].matrices.shape) == ("dense_general", (1, 18, 8))


def linen_attention_params():
    """Params of Embed → MultiHeadDotProductAttention → Conv(3) → Dense: flax's tree and shapes
    (``eval_shape``, nothing compiled), filled with normal draws."""
    import flax.linen as nn
    import jax

    class Model(nn.Module):
        @nn.compact
        def __call__(self, tokens):
            h = nn.Embed(50, 16)(tokens)
            h = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=32, out_features=24)(h)
            h = nn.Conv(12, (3,))(h)
            return nn.Dense(3)(h)

    shapes = jax.eval_shape(Model().init, jax.random.key(0), jax.ShapeDtypeStruct((2, 7), np.int32))["params"]
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda leaf: rng.normal(size=leaf.shape), shapes)


def test_layers_of_a_linen_attention_model():
    params = linen_attention_params()
    attention = "MultiHeadDotProductAttention_0"
    layers = cv.weight_layers(params)
    assert {name: (layer.kind, layer.matrices.shape) for name, layer in layers.items()} == {
        "Conv_0": ("conv", (3, 24, 12)),  # one (in, out) slice per position
        "Dense_0": ("dense", (1, 12, 3)),
        "Embed_0": ("embedding", (1, 50, 16)),
        f"{attention}/key": ("dense_general", (1, 16, 32)),
        f"{attention}/out": ("dense_general", (1, 32, 24)),
        f"{attention}/query": ("dense_general", (1, 16, 32)),
        f"{attention}/value": ("dense_general", (1, 16, 32)),
    }
    np.testing.assert_array_equal(layers["Conv_0"].matrices, params["Conv_0"]["kernel"])
    np.testing.assert_array_equal(
        layers[f"{attention}/out"].matrices[0], params[attention]["out"]["kernel"].reshape(32, 24)
    )
    result = cv.weight_spectra(params)
    conv = result.layers["Conv_0"]
    assert (conv.matrix_shape, conv.num_matrices, conv.num_eigenvalues) == ((24, 12), 3, 36)
    names = result.per_layer_scalars()
    assert set(names) == {f"{layer}/{metric}" for layer in layers for metric in METRICS}
    assert all(part for name in names for part in name.split("/"))
    assert np.isnan(names["Dense_0/alpha"]) and np.isfinite(names["Dense_0/log10_frobenius_norm"])
    assert names[f"{attention}/query/alpha"] == result.layers[f"{attention}/query"].power_law.alpha


def test_nnx_state_paths_name_the_same_layers():
    import jax
    from flax import nnx

    import ntkcv

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(50, 16, rngs=rngs)
            self.attention = nnx.MultiHeadAttention(4, 16, qkv_features=32, out_features=24, decode=False, rngs=rngs)
            self.conv = nnx.Conv(24, 12, kernel_size=(3,), rngs=rngs)
            self.head = nnx.Linear(12, 3, rngs=rngs)

    shapes = ntkcv.from_nnx(nnx.eval_shape(lambda: Model(nnx.Rngs(0)))).params  # an nnx.State, nothing computed
    rng = np.random.default_rng(0)
    layers = cv.weight_layers(jax.tree.map(lambda leaf: rng.normal(size=leaf.shape), shapes))
    assert {name: (layer.kind, layer.matrices.shape) for name, layer in layers.items()} == {
        "attention/key": ("dense_general", (1, 16, 32)),
        "attention/out": ("dense_general", (1, 32, 24)),
        "attention/query": ("dense_general", (1, 16, 32)),
        "attention/value": ("dense_general", (1, 16, 32)),
        "conv": ("conv", (3, 24, 12)),
        "embed": ("embedding", (1, 50, 16)),
        "head": ("dense", (1, 12, 3)),
    }


def test_layer_names_are_safe_and_unique():
    w = np.random.default_rng(0).normal(size=(6, 4))
    layers = cv.weight_layers({"kernel": w, "": {"a b:c": {"kernel": w}}, "both": {"kernel": w, "embedding": w}})
    assert set(layers) == {"kernel", "_/a_b_c", "both/kernel", "both/embedding"}
    assert layers["_/a_b_c"].path == "/a b:c/kernel"


METRICS = ("alpha", "alpha_weighted", "log10_spectral_norm", "log10_frobenius_norm", "stable_rank", "matrix_entropy")


def test_weight_spectra_of_a_params_tree():
    rng = np.random.default_rng(0)
    params = {
        "params": {
            "Conv_0": {"kernel": rng.normal(size=(3, 3, 8, 16)), "bias": np.zeros(16)},
            "Dense_0": {"kernel": rng.standard_t(3, size=(200, 100))},
            "Dense_1": {"kernel": rng.normal(size=(100, 4))},
            "Dense_2": {"kernel": np.zeros((30, 20))},
        }
    }
    result = cv.weight_spectra(params)
    assert set(result.layers) == {"params/Conv_0", "params/Dense_0", "params/Dense_1"}
    assert "4 non-zero eigenvalues" in result.skipped["params/Dense_1"]
    assert "zero" in result.skipped["params/Dense_2"]
    unfitted = result.layers["params/Dense_1"]  # too few eigenvalues for a fit: norms only
    lam4 = np.linalg.svd(params["params"]["Dense_1"]["kernel"], compute_uv=False) ** 2 / 100
    assert np.isnan(unfitted.power_law.alpha) and np.isnan(unfitted.alpha_weighted)
    assert unfitted.log10_frobenius_norm == pytest.approx(np.log10(lam4.sum()))
    layer = result.layers["params/Dense_0"]
    lam = np.linalg.svd(params["params"]["Dense_0"]["kernel"], compute_uv=False) ** 2 / 200
    assert layer.num_eigenvalues == 100
    assert layer.log10_spectral_norm == pytest.approx(np.log10(lam.max()))
    assert layer.log10_frobenius_norm == pytest.approx(np.log10(lam.sum()))
    assert layer.stable_rank == pytest.approx(lam.sum() / lam.max())
    assert layer.alpha_weighted == pytest.approx(layer.power_law.alpha * np.log10(lam.max()))
    p = lam / lam.sum()
    assert layer.matrix_entropy == pytest.approx(-np.sum(p * np.log(p)) / np.log(100))
    assert result.layers["params/Conv_0"].num_eigenvalues == 9 * 8
    fitted = [result.layers[name] for name in ("params/Conv_0", "params/Dense_0")]
    assert set(result.summary) == set(METRICS)
    for metric in METRICS:  # the unfitted layer is left out of the summary
        assert result.summary[metric] == pytest.approx(np.mean([layer.scalars()[metric] for layer in fitted]))


def test_fit_power_law_rejects_non_positive_values():
    with pytest.raises(ValueError, match="positive"):
        cv.fit_power_law(np.array([0.0, 1.0, 2.0]))


def test_non_finite_layers_are_skipped_with_the_reason():
    rng = np.random.default_rng(0)
    diverged = rng.normal(size=(60, 40))
    diverged[3, 5] = np.nan
    result = cv.weight_spectra({"a": {"kernel": diverged}, "b": {"kernel": rng.normal(size=(60, 40))}})
    assert set(result.layers) == {"b"}
    assert "non-finite" in result.skipped["a"]
    assert result.summary["alpha"] == pytest.approx(result.layers["b"].power_law.alpha)
