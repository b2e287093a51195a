"""The infinite-width NNGP and NTK against independent references: closed forms written out in numpy (summed over
layers, not recursed), Gauss–Hermite quadrature against closed forms, finite-width Flax networks averaged over
initialisations, and neural-tangents' ``stax`` (the peer)."""

import json
import math
import subprocess

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import ntkcv
from benchmarks.reference_models import PEER_PYTHON, peer_available, peer_env
from ntkcv.infinite import empirical_scale, infinite_width_nngp, infinite_width_ntk
from ntkcv.zoo import MLP
from tests.ntk.models import relative_error


def inputs(n: int, d: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d))


# ---- an independent numpy reference: pairwise 2 × 2 covariances, the NTK as a sum over layers ----

def _relu_pair(k11, k12, k22):
    """Cho & Saul's arc-cosine kernels of degrees 1 and 0, halved: E[relu(u) relu(v)] and E[step(u) step(v)]."""
    norm = math.sqrt(k11 * k22)
    theta = math.acos(max(-1.0, min(1.0, k12 / norm)))
    return norm * (math.sin(theta) + (math.pi - theta) * math.cos(theta)) / (2 * math.pi), 1 / 2 - theta / (2 * math.pi)


def _erf_pair(k11, k12, k22):
    """Williams (1997); E[erf' erf'] = (4/π) det(I + 2Σ)^(-1/2)."""
    det = np.linalg.det(np.eye(2) + 2 * np.array([[k11, k12], [k12, k22]]))
    return 2 / math.pi * math.asin(2 * k12 / math.sqrt((1 + 2 * k11) * (1 + 2 * k22))), 4 / math.pi / math.sqrt(det)


PAIRS = {"relu": _relu_pair, "erf": _erf_pair, "identity": lambda k11, k12, k22: (k12, 1.0)}


def reference(x1, x2, depth, activation, parameterization, weight_std, bias_std):
    """(NNGP, NTK) of one output: Σ^l for every layer, then Θ = Σ_l (gradient of layer l's parameters), with
    Θ_ntk = Σ_{l=0..L} Σ^{l+1} Π_{m>l+1} Σ̇^m and Θ_std = Σ_{l=1..L} E[φφ](Σ^l) Π_{m>l+1} Σ̇^m."""
    pair, w2, b2 = PAIRS[activation], weight_std**2, bias_std**2
    x = np.concatenate([x1, x2])
    sigma = [w2 * x @ x.T / x.shape[1] + b2]  # Σ^1 … Σ^{L+1} on all pairs of x1 ∪ x2
    expectations, derivatives = [], []  # E[φφ](Σ^l), Σ̇^{l+1} for l = 1 … L
    for _ in range(depth):
        s = sigma[-1]
        pairs = np.array([[pair(s[i, i], s[i, j], s[j, j]) for j in range(len(x))] for i in range(len(x))])
        expectations.append(pairs[..., 0])
        derivatives.append(w2 * pairs[..., 1])
        sigma.append(w2 * pairs[..., 0] + b2)

    def backward(layer):  # Π_{m = layer+2 … L+1} Σ̇^m
        return np.prod(derivatives[layer:], axis=0) if layer < depth else np.ones_like(sigma[0])

    if parameterization == "ntk":
        ntk = sum(sigma[layer] * backward(layer) for layer in range(depth + 1))
    else:
        ntk = sum(expectations[layer - 1] * backward(layer) for layer in range(1, depth + 1))
    n1 = len(x1)
    return sigma[-1][:n1, n1:], ntk[:n1, n1:]


@pytest.mark.parametrize("parameterization", ["ntk", "standard"])
@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("activation", ["relu", "erf", "identity"])
def test_closed_forms_match_the_numpy_reference(activation, depth, parameterization):
    x1, x2 = inputs(5, 4, seed=1), inputs(3, 4, seed=2)
    options = {"parameterization": parameterization, "weight_std": 1.3, "bias_std": 0.4}
    nngp, ntk = reference(x1, x2, depth, activation, parameterization, 1.3, 0.4)
    with jax.enable_x64(True):
        assert relative_error(infinite_width_nngp(depth, activation, **options)(x1, x2), nngp) < 1e-12
        assert relative_error(infinite_width_ntk(depth, activation, **options)(x1, x2), ntk) < 1e-12


def test_linear_model_is_the_scaled_gram_matrix():
    x1, x2 = inputs(4, 6), inputs(3, 6, seed=1)
    expected = 2.0**2 * x1 @ x2.T / 6 + 0.5**2
    with jax.enable_x64(True):
        for kernel in (infinite_width_ntk, infinite_width_nngp):
            np.testing.assert_allclose(kernel(0, "relu", weight_std=2.0, bias_std=0.5)(x1, x2), expected, rtol=1e-12)
        # a deep linear network: Σ^{l+1} = σ_w² Σ^l + σ_b², and every layer adds its Σ^{l+1} to Θ
        gram = x1 @ x2.T / 6
        sigma = [2.0 * gram + 0.5, 4.0 * gram + 1.5, 8.0 * gram + 3.5]
        ntk = sigma[0] * 4.0 + sigma[1] * 2.0 + sigma[2]
        options = {"weight_std": math.sqrt(2.0), "bias_std": math.sqrt(0.5)}
        np.testing.assert_allclose(infinite_width_nngp(2, "linear", **options)(x1, x2), sigma[2], rtol=1e-12)
        np.testing.assert_allclose(infinite_width_ntk(2, "identity", **options)(x1, x2), ntk, rtol=1e-12)


@pytest.mark.parametrize("parameterization", ["ntk", "standard"])
def test_quadrature_matches_erfs_closed_form(parameterization):
    # 17 × 19 pairs: more entries than one batch of the quadrature
    x1, x2 = inputs(17, 5), inputs(19, 5, seed=1)
    options = {"parameterization": parameterization, "bias_std": 0.2}
    with jax.enable_x64(True):
        for kernel in (infinite_width_nngp, infinite_width_ntk):
            closed = kernel(2, "erf", **options)(x1, x2)
            assert relative_error(kernel(2, jax.scipy.special.erf, **options)(x1, x2), closed) < 1e-7


def test_quadrature_of_relu_converges_slowly_to_its_closed_form():
    """The kink limits Gauss–Hermite quadrature to about two digits: use the name, not a callable."""
    x = inputs(6, 4)
    with jax.enable_x64(True):
        for kernel in (infinite_width_nngp, infinite_width_ntk):
            assert relative_error(kernel(2, jax.nn.relu)(x), kernel(2, "relu")(x)) < 3e-2


def test_named_activations_are_their_functions():
    x = inputs(4, 3)
    with jax.enable_x64(True):
        for name, fn in (("gelu", jax.nn.gelu), ("sigmoid", jax.nn.sigmoid)):  # tanh: see the Monte Carlo test
            np.testing.assert_allclose(infinite_width_ntk(1, name)(x), infinite_width_ntk(1, fn)(x), rtol=1e-12)


def test_inputs_are_flattened_and_keep_their_precision(dtype):
    x = jnp.asarray(inputs(4, 6), dtype)
    kernel_fn = infinite_width_ntk(1, "tanh", bias_std=0.1)
    flat = kernel_fn(x)
    assert flat.dtype == dtype and flat.shape == (4, 4)
    np.testing.assert_allclose(kernel_fn(x.reshape(4, 2, 3)), flat, rtol=1e-6)
    assert infinite_width_ntk(1, "relu")(jnp.ones((2, 3), jnp.int32)).dtype == jnp.zeros(()).dtype


# ---- finite width: Flax networks at initialisation, averaged over seeds ----

class NTKParameterisedMLP(nn.Module):
    """A relu MLP in the NTK parameterisation: each layer ``h ↦ σ_w/√fan_in · h W + σ_b b`` with standard normal
    ``W``, ``b`` (the weights in an ``nn.Dense``, so that ``ntk_fn``'s structured implementation covers them)."""

    widths: tuple[int, ...]
    weight_std: float = 1.4
    bias_std: float = 0.3

    @nn.compact
    def __call__(self, x):
        for layer, width in enumerate(self.widths):
            x = x if layer == 0 else nn.relu(x)
            scaled = self.weight_std / math.sqrt(x.shape[-1]) * x
            x = nn.Dense(width, use_bias=False, kernel_init=nn.initializers.normal(1.0))(scaled)
            x = x + self.bias_std * self.param(f"bias_{layer}", nn.initializers.normal(1.0), (width,))[None]
        return x


def finite_width_network(parameterization, width, num_outputs, x):
    """``(apply_fn, init(key) -> params)`` with two hidden layers: the relu MLP above (``"ntk"``) or a Flax ``nn.Dense``
    tanh MLP with Flax's default initialisation (``"standard"``)."""
    if parameterization == "ntk":
        module = NTKParameterisedMLP((width, width, num_outputs))
    else:
        module = MLP((width, width), num_outputs, "tanh")
    init = jax.jit(lambda key: module.init(key, x)["params"])
    return (lambda params, x: module.apply({"params": params}, x)), init


@pytest.mark.parametrize("parameterization", ["ntk", "standard"])
def test_empirical_ntk_converges_with_width(parameterization):
    """The mean empirical NTK of 8 initialisations, over ``empirical_scale``, against the limit: relu (closed form) in
    the NTK parameterisation, tanh (quadrature) in the standard one; two outputs, so that the factor K is tested."""
    x, num_outputs, seeds = jnp.asarray(inputs(8, 8), jnp.float32), 2, 8
    activation, options = ("relu", {"weight_std": 1.4, "bias_std": 0.3}) if parameterization == "ntk" else ("tanh", {})
    expected = infinite_width_ntk(2, activation, parameterization=parameterization, **options)(x)
    errors = {}
    for width in (64, 1024):
        apply_fn, init = finite_width_network(parameterization, width, num_outputs, x)
        kernel_fn = ntkcv.ntk_fn(apply_fn)
        mean = sum(kernel_fn(init(jax.random.key(seed)), x) for seed in range(seeds)) / seeds
        errors[width] = relative_error(mean / empirical_scale(parameterization, num_outputs=num_outputs, width=width),
                                       expected)
    assert errors[1024] < 0.05 and errors[1024] < errors[64] / 2, errors


# ---- the peer: neural-tangents' stax kernels, in float64 ----

PEER_SCRIPT = """
import json, sys
import jax
jax.config.update("jax_enable_x64", True)
import numpy as np
from neural_tangents import stax
cases, inputs, output = json.loads(sys.argv[1]), np.load(sys.argv[2]), sys.argv[3]
activations = {"relu": stax.Relu, "erf": stax.Erf, "gelu": stax.Gelu}
kernels = {}
for name, case in cases.items():
    def dense(width):
        return stax.Dense(width, case["weight_std"], case["bias_std"], parameterization=case["parameterization"])
    hidden = [(dense(case["width"]), activations[case["activation"]]()) for _ in range(case["depth"])]
    layers = [layer for pair in hidden for layer in pair]
    out = stax.serial(*layers, dense(1))[2](inputs["x1"], inputs["x2"], ("nngp", "ntk"))
    kernels[name + "/nngp"], kernels[name + "/ntk"] = np.asarray(out.nngp), np.asarray(out.ntk)
np.savez(output, **kernels)
"""


def run_peer_kernels(cases: dict, x1: np.ndarray, x2: np.ndarray, tmp_path) -> dict:
    np.savez(tmp_path / "x.npz", x1=x1, x2=x2)
    result = subprocess.run([str(PEER_PYTHON), "-c", PEER_SCRIPT, json.dumps(cases), str(tmp_path / "x.npz"),
                             str(tmp_path / "out.npz")], capture_output=True, text=True, timeout=600,
                            env=peer_env())
    if result.returncode:
        raise RuntimeError(f"peer failed: {result.stderr[-2000:]}")
    return dict(np.load(tmp_path / "out.npz"))


@pytest.mark.peer
@pytest.mark.skipif(not peer_available(), reason="peer environment absent")
def test_agrees_with_neural_tangents(tmp_path):
    """NTK parameterisation: equal kernels. Standard: neural-tangents keeps the base width ``n`` and its kernel is
    affine in ``n`` (``n Θ_std`` plus the first layer's and the biases' terms), so ours is its slope."""
    x1, x2 = inputs(5, 6), inputs(4, 6, seed=1)
    common = {"weight_std": 1.4, "bias_std": 0.3, "width": 64}
    cases = {"relu": {"activation": "relu", "depth": 2, "parameterization": "ntk", **common},
             "erf": {"activation": "erf", "depth": 3, "parameterization": "ntk", **common},
             "gelu": {"activation": "gelu", "depth": 2, "parameterization": "ntk", **common},
             "standard": {"activation": "relu", "depth": 2, "parameterization": "standard", **common},
             "standard_wide": {"activation": "relu", "depth": 2, "parameterization": "standard", **common,
                               "width": 128}}
    peer = run_peer_kernels(cases, x1, x2, tmp_path)
    exact_gelu = lambda u: jax.nn.gelu(u, approximate=False)  # noqa: E731  stax.Gelu is the exact one
    options = {"weight_std": 1.4, "bias_std": 0.3}
    with jax.enable_x64(True):
        errors = {}
        for name, activation, depth in (("relu", "relu", 2), ("erf", "erf", 3), ("gelu", exact_gelu, 2)):
            errors[name + "/nngp"] = relative_error(infinite_width_nngp(depth, activation, **options)(x1, x2),
                                                    peer[name + "/nngp"])
            errors[name + "/ntk"] = relative_error(infinite_width_ntk(depth, activation, **options)(x1, x2),
                                                   peer[name + "/ntk"])
        standard = {"parameterization": "standard", **options}
        slope = (peer["standard_wide/ntk"] - peer["standard/ntk"]) / 64
        errors["standard/ntk"] = relative_error(infinite_width_ntk(2, "relu", **standard)(x1, x2), slope)
        errors["standard/nngp"] = relative_error(infinite_width_nngp(2, "relu", **standard)(x1, x2),
                                                 peer["standard/nngp"])
    assert all(error < 1e-10 for error in errors.values()), errors


# ---- errors and the scale ----

@pytest.mark.parametrize(("args", "options", "match"), [
    ((1, "swish"), {}, "activation must be one of 'relu', 'erf'"),
    ((1, "relu"), {"parameterization": "mup"}, "parameterization must be 'ntk' or 'standard', got 'mup'"),
    ((-1, "relu"), {}, "depth .* must be an integer >= 0, got -1"),
    ((1.0, "relu"), {}, "depth"),
    ((1, "relu"), {"weight_std": 0.0}, "weight_std must be > 0, got 0.0"),
    ((1, "relu"), {"bias_std": -0.1}, "bias_std must be >= 0, got -0.1"),
    ((0, "relu"), {"parameterization": "standard"}, "needs depth >= 1"),
])
@pytest.mark.parametrize("kernel", [infinite_width_ntk, infinite_width_nngp])
def test_bad_arguments_raise(kernel, args, options, match):
    with pytest.raises(ValueError, match=match):
        kernel(*args, **options)


def test_bad_inputs_raise():
    with pytest.raises(TypeError, match="activation must be a name or a callable, got int"):
        infinite_width_ntk(1, 3)
    kernel_fn = infinite_width_ntk(1, "relu")
    with pytest.raises(ValueError, match="as many features"):
        kernel_fn(jnp.ones((2, 3)), jnp.ones((2, 4)))
    with pytest.raises(ValueError, match=r"batch of inputs \(n, ...\) with at least one feature, got shape \(3,\)"):
        kernel_fn(jnp.ones(3))


def test_empirical_scale():
    assert empirical_scale("ntk", num_outputs=10, width=512) == 10.0
    assert empirical_scale("standard", num_outputs=10, width=512) == 5120.0
    with pytest.raises(ValueError, match="parameterization"):
        empirical_scale("NTK", num_outputs=1, width=1)
    with pytest.raises(ValueError, match="width must be an integer >= 1, got 0"):
        empirical_scale("standard", num_outputs=1, width=0)
    with pytest.raises(ValueError, match=r"num_outputs must be an integer >= 1, got 2\.0"):
        empirical_scale("ntk", num_outputs=2.0, width=8)


# ---- properties ----

KERNEL_FNS = {
    "relu-ntk": infinite_width_ntk(2, "relu", bias_std=0.2),
    "erf-standard": infinite_width_ntk(2, "erf", parameterization="standard"),
    "tanh-ntk": infinite_width_ntk(1, "tanh", bias_std=0.5),
    "tanh-nngp": infinite_width_nngp(2, "tanh"),
    "linear-ntk": infinite_width_ntk(0, "linear"),
}


@settings(max_examples=15, deadline=None)
@given(x=arrays(np.float64, (6, 3), elements=st.floats(-2, 2)), name=st.sampled_from(sorted(KERNEL_FNS)))
def test_kernels_are_symmetric_positive_semidefinite(x, name):
    kernel_fn = KERNEL_FNS[name]
    with jax.enable_x64(True):
        kernel = np.asarray(kernel_fn(x))
        np.testing.assert_array_equal(kernel_fn(x, x), kernel)
    scale = max(1.0, np.abs(kernel).max())
    np.testing.assert_allclose(kernel, kernel.T, rtol=1e-10, atol=1e-12 * scale)
    assert np.linalg.eigvalsh(kernel).min() >= -1e-8 * scale


def test_kernel_fn_composes_with_jit_and_vmap():
    xs = jnp.asarray(np.stack([inputs(4, 3, seed) for seed in range(3)]), jnp.float32)
    kernel_fn = infinite_width_ntk(1, "tanh", bias_std=0.1)
    expected = np.stack([kernel_fn(x) for x in xs])
    batched = jax.jit(jax.vmap(lambda x: kernel_fn(x, 2 * x)))(xs)
    np.testing.assert_allclose(batched, np.stack([kernel_fn(x, 2 * x) for x in xs]), rtol=1e-6)
    np.testing.assert_allclose(jax.jit(lambda xs: jax.vmap(kernel_fn)(xs) / 2)(xs), expected / 2, rtol=1e-6)
