"""The zoo MLP's NTK parameterisation: its kernel tends to the infinite-width NTK, the structured implementation covers
it exactly, the standard one is unchanged, and ``model.parameterization`` reaches it from a run config."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntkcv
from ntkcv.config import ConfigError, load_config
from ntkcv.data import load_dataset
from ntkcv.infinite import infinite_width_ntk
from ntkcv.ntk import structured
from ntkcv.ntk.layout import canonical_fn, output_layout
from ntkcv.report import read_scalars
from ntkcv.train import train
from ntkcv.zoo import MLP, NTK_BIAS_STD, NTK_WEIGHT_STD, make_model
from tests.ntk.models import relative_error

NUM_OUTPUTS = 10


def digits(n: int) -> jax.Array:
    return jnp.asarray(load_dataset("digits", train_size=n, seed=0).x_train)


def empirical_over_outputs(width: int, activation: str, x: jax.Array, seed: int = 0) -> jax.Array:
    """The traced empirical NTK of the NTK-parameterised w×w MLP over K: the estimate of one output's kernel."""
    module = make_model("mlp", num_outputs=NUM_OUTPUTS, widths=(width, width), activation=activation,
                        parameterization="ntk")
    params = module.init(jax.random.key(seed), x)["params"]
    return ntkcv.ntk_fn(lambda p, x: module.apply({"params": p}, x))(params, x) / NUM_OUTPUTS


@pytest.mark.parametrize("activation", ["tanh", "erf"])
def test_empirical_kernel_over_outputs_converges_to_the_infinite_width_ntk(activation):
    """At width 2048 one initialisation's Θ/K is within 3% (Frobenius) of Θ∞ on 32 digits, and closer than at 64:
    tanh by quadrature, erf in closed form. (ReLU's positive mean makes one seed's kernel fluctuate by 5–14% there.)"""
    x = digits(32)
    expected = infinite_width_ntk(2, activation, parameterization="ntk", weight_std=NTK_WEIGHT_STD,
                                  bias_std=NTK_BIAS_STD)(x)
    errors = {width: relative_error(empirical_over_outputs(width, activation, x), expected) for width in (64, 2048)}
    assert errors[2048] < 0.03, errors
    assert errors[2048] < errors[64] / 3, errors  # fluctuations O(width^(-1/2)): 1/√32 ≈ 0.18 expected


def test_ntk_parameterisation_is_plain_dense_layers_the_structured_kernel_covers_exactly():
    x = digits(6)
    module = MLP((16, 8), 3, "tanh", parameterization="ntk")
    params = module.init(jax.random.key(1), x)["params"]
    assert {name: set(leaves) for name, leaves in params.items()} == {f"Dense_{i}": {"kernel", "bias"}
                                                                      for i in range(3)}
    kernel, bias = params["Dense_0"]["kernel"], params["Dense_0"]["bias"]
    assert 0.8 < float(jnp.std(kernel)) < 1.2 and float(jnp.std(bias)) > 0.3  # N(0, 1) weights and biases

    def apply_fn(p, x):
        return module.apply({"params": p}, x)

    # the forward pass: σ_w/√fan_in · h W + σ_b b per layer
    h = x.reshape(len(x), -1)
    for i in range(3):
        layer = params[f"Dense_{i}"]
        h = NTK_WEIGHT_STD / math.sqrt(h.shape[-1]) * h @ layer["kernel"] + NTK_BIAS_STD * layer["bias"][None]
        h = jnp.tanh(h) if i < 2 else h
    np.testing.assert_allclose(apply_fn(params, x), h, rtol=1e-5, atol=1e-5)
    f = canonical_fn(apply_fn, output_layout(apply_fn, params, x, (-1,)))
    assert structured.coverage(f, params, x).fallback == ()  # every leaf in a covered Dense layer
    exact = ntkcv.ntk_fn(apply_fn, implementation="jacobian")(params, x)
    assert relative_error(ntkcv.ntk_fn(apply_fn, implementation="structured")(params, x), exact) < 1e-5


def test_standard_parameterisation_is_the_default_and_unchanged():
    x = digits(4)
    module = make_model("mlp", num_outputs=3, widths=(8,))
    assert module.parameterization == "standard"
    params = module.init(jax.random.key(0), x)["params"]
    reference = nn.Sequential([nn.Dense(8), jnp.tanh, nn.Dense(3)])
    flat = x.reshape(len(x), -1)
    reference_params = reference.init(jax.random.key(0), flat)["params"]
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, {f"Dense_{i}": reference_params[f"layers_{2 * i}"]
                                                                       for i in range(2)})
    assert float(jnp.abs(params["Dense_0"]["bias"]).max()) == 0  # Flax's zero biases
    hidden = jnp.tanh(flat @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"][None])
    np.testing.assert_allclose(module.apply({"params": params}, x),
                               hidden @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"][None], rtol=1e-6)


def test_bad_parameterisations_are_errors_naming_the_option():
    with pytest.raises(ValueError, match=r"mlp\.parameterization must be one of standard, ntk, got 'mup'"):
        make_model("mlp", num_outputs=2, parameterization="mup")
    with pytest.raises(ValueError, match=r"unknown option.*parameterization.*'cnn'"):
        make_model("cnn", num_outputs=2, parameterization="ntk")
    with pytest.raises(ConfigError, match=r"model\.parameterization must be one of 'standard', 'ntk'; got 'mup'"):
        load_config(None, {"model.parameterization": "mup"})
    with pytest.raises(ConfigError, match=r"model\.parameterization 'ntk' needs model\.kind 'mlp'.*got 'cnn'"):
        load_config(None, {"model.kind": "cnn", "model.parameterization": "ntk"})
    assert load_config(None, {}).model.parameterization == "standard"


@pytest.mark.standard_dtype_promotion
def test_a_run_in_the_ntk_parameterisation_starts_near_its_infinite_width_kernel(tmp_path):
    """``model.parameterization: ntk`` reaches the model (a standard network is 0.3 away at this width: README), and
    ``monitor.infinite_width`` compares it with the NTK-parameterised limit."""
    config = load_config(None, {"data.train_size": 32, "data.probe_set": "train", "model.widths": [1024, 1024],
                                "model.parameterization": "ntk", "train.steps": 1, "train.batch_size": "full",
                                "monitor.every_steps": 1, "monitor.probe_sets": ["train"], "monitor.cvs": [],
                                "monitor.drift": False, "monitor.weight_metrics": False, "monitor.spectrum": False,
                                "monitor.infinite_width": True, "output.tensorboard": False, "output.progress": False,
                                "output.dir": str(tmp_path)})
    train(config)
    series = read_scalars(tmp_path / "ntkcv.h5")
    _, distance = series["cv/infinite_width/relative_distance"]
    assert distance[0] < 0.05, distance
