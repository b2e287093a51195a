import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ntkcv.zoo import ACTIVATIONS, MODEL_KINDS, make_model

# Small models keep the tests fast; every kind and option is exercised somewhere below.
SMALL = {
    "mlp": {"widths": (16, 16), "activation": "tanh"},
    "cnn": {"channels": (4, 8), "widths": (16,), "activation": "relu"},
    "transformer": {"dim": 16, "depth": 2, "heads": 2, "mlp_ratio": 2},
}
DIGITS, MNIST = (5, 8, 8, 1), (5, 28, 28, 1)


def key(seed):
    """A PRNG key; the "rbg" implementation compiles several times faster than threefry on CPU."""
    return jax.random.key(seed, impl="rbg")


@functools.cache
def built(kind):
    """(model, jitted init, params, jitted apply, x) for a SMALL model of ``kind`` on digits-shaped inputs."""
    model = make_model(kind, num_outputs=3, **SMALL[kind])
    x = jnp.asarray(np.random.default_rng(1).uniform(size=DIGITS), jnp.float32)
    init = jax.jit(model.init)
    params = init(key(0), x)["params"]
    apply = jax.jit(lambda p, x: model.apply({"params": p}, x))
    return model, init, params, apply, x


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_output_shape_on_digits(kind):
    _, _, params, apply, x = built(kind)
    out = apply(params, x)
    assert out.shape == (5, 3) and out.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out)))


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_output_shape_on_mnist(kind):
    model = make_model(kind, num_outputs=10, **SMALL[kind])
    x = jnp.zeros(MNIST)
    out = jax.eval_shape(lambda: model.apply(model.init(jax.random.key(0), x), x))  # traced, not compiled
    assert out.shape == (5, 10) and out.dtype == jnp.float32


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_init_is_deterministic_in_the_seed(kind):
    _, init, params, _, x = built(kind)
    same = init(key(0), x)["params"]
    other = init(key(1), x)["params"]
    jax.tree.map(np.testing.assert_array_equal, params, same)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(other), strict=True))


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_samples_do_not_interact(kind):
    """Output i depends on input i only: one at a time, in a permuted batch, and next to a changed neighbour."""
    model, _, params, apply, x = built(kind)
    out = apply(params, x)
    one_at_a_time = jax.jit(jax.vmap(lambda xi: model.apply({"params": params}, xi[None])[0]))
    alone = one_at_a_time(x)
    np.testing.assert_allclose(alone, out, rtol=1e-5, atol=1e-6)
    perm = jnp.array([3, 0, 4, 1, 2])
    np.testing.assert_allclose(apply(params, x[perm]), out[perm], rtol=1e-5, atol=1e-6)
    changed = x.at[1:].set(np.random.default_rng(7).normal(size=x[1:].shape))
    np.testing.assert_allclose(apply(params, changed)[0], out[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_sgd_steps_reduce_the_loss(kind):
    model, _, params, _, x = built(kind)
    labels = jnp.array([0, 1, 2, 0, 1])
    optimizer = optax.sgd(0.1)

    def loss_fn(p):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), labels).mean()

    @jax.jit
    def step(p, state):
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, state = optimizer.update(grads, state, p)
        return optax.apply_updates(p, updates), state, loss

    state = optimizer.init(params)
    losses = []
    for _ in range(6):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_every_activation_builds(activation):
    model = make_model("mlp", num_outputs=2, widths=(4,), activation=activation)
    x = jnp.linspace(-1, 1, 6).reshape(2, 3)
    out = model.apply(model.init(key(0), x), x)
    assert out.shape == (2, 2)


def test_mlp_parameter_names_follow_the_peer_spec():
    model = make_model("mlp", num_outputs=10, widths=(32, 16))
    shapes = jax.tree.map(jnp.shape, jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1))))
    assert shapes["params"]["Dense_0"]["kernel"] == (64, 32)
    assert shapes["params"]["Dense_2"]["kernel"] == (16, 10)
    cnn = make_model("cnn", num_outputs=10, channels=(4, 8), widths=(16,))
    shapes = jax.tree.map(jnp.shape, jax.eval_shape(cnn.init, jax.random.key(0), jnp.zeros((1, 28, 28, 1))))
    assert shapes["params"]["Conv_0"]["kernel"] == (3, 3, 1, 4)
    assert shapes["params"]["Dense_0"]["kernel"] == (7 * 7 * 8, 16)  # 28 -> 14 -> 7 after two 2×2 pools


def test_transformer_token_and_sequence_inputs():
    model = make_model("transformer", num_outputs=4, dim=8, heads=2, depth=1, vocab_size=11)
    tokens = jnp.array([[1, 2, 3, 10], [0, 0, 5, 6]])
    assert jax.eval_shape(lambda: model.apply(model.init(jax.random.key(0), tokens), tokens)).shape == (2, 4)
    floats = make_model("transformer", num_outputs=4, dim=8, heads=2, depth=1)
    for x in (jnp.zeros((2, 6, 5)), jnp.zeros((2, 7))):
        assert jax.eval_shape(lambda x=x: floats.apply(floats.init(jax.random.key(0), x), x)).shape == (2, 4)
    with pytest.raises(ValueError, match="set vocab_size"):
        jax.eval_shape(floats.init, jax.random.key(0), tokens)
    with pytest.raises(ValueError, match="expects integer tokens"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((2, 4)))


@pytest.mark.parametrize(
    "kind, options, match",
    [
        ("resnet", {}, "unknown model kind 'resnet'; allowed: mlp, cnn, transformer"),
        ("mlp", {"depth": 3}, "unknown option.*depth.*'mlp'; allowed: widths, activation"),
        ("transformer", {"widths": (4,)}, "unknown option.*widths.*allowed: dim, depth, heads"),
        ("mlp", {"activation": "swish"}, "mlp.activation must be one of tanh, relu, gelu, sigmoid, erf, got 'swish'"),
        ("mlp", {"widths": (16, 0)}, "mlp.widths must be a positive integer, got 0"),
        ("mlp", {"widths": 16}, "mlp.widths must be a sequence of positive integers"),
        ("cnn", {"channels": ()}, "cnn.channels must hold at least one"),
        ("transformer", {"dim": 10, "heads": 4}, "heads must divide transformer.dim"),
        ("transformer", {"depth": 1.5}, "transformer.depth must be a positive integer"),
    ],
)
def test_bad_kinds_and_options(kind, options, match):
    with pytest.raises(ValueError, match=match):
        make_model(kind, num_outputs=10, **options)


def test_bad_num_outputs_and_inputs():
    with pytest.raises(ValueError, match="num_outputs must be a positive integer"):
        make_model("mlp", num_outputs=0)
    cnn = make_model("cnn", num_outputs=2, channels=(4, 4, 4, 4))
    with pytest.raises(ValueError, match="at least 16 pixels a side"):
        jax.eval_shape(cnn.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    with pytest.raises(ValueError, match=r"cnn expects images \(N, H, W, C\)"):
        jax.eval_shape(cnn.init, jax.random.key(0), jnp.zeros((1, 64)))
