"""``ntkcv.from_equinox``: every implementation against a float64 dense ``jax.jacrev`` kernel of the module vmapped by
hand, and which equinox layers the structured path factorises (``Linear``, ``Conv1d/2d/3d``, ``Embedding``)."""

import logging
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntkcv
from ntkcv.ntk import structured
from ntkcv.ntk.layout import canonical_fn, output_layout
from tests.ntk.models import reference_kernel, relative_error

eqx = pytest.importorskip("equinox")

TOLERANCE = {"float32": 1e-5, "float64": 1e-10}


class Custom(eqx.Module):
    """Non-array fields (an activation function, an int), a frozen integer array, ``Linear`` layers with a ``"scalar"``
    input and output and one without bias."""

    first: eqx.nn.Linear
    hidden: eqx.nn.Linear
    last: eqx.nn.Linear
    activation: Callable
    scale: int
    permutation: jax.Array

    def __init__(self, key, dtype):
        keys = jax.random.split(key, 3)
        self.first = eqx.nn.Linear("scalar", 6, key=keys[0], dtype=dtype)
        self.hidden = eqx.nn.Linear(6, 6, use_bias=False, key=keys[1], dtype=dtype)
        self.last = eqx.nn.Linear(6, "scalar", key=keys[2], dtype=dtype)
        self.activation = jnp.tanh
        self.scale = 3
        self.permutation = jnp.array([5, 3, 1, 0, 2, 4], jnp.int32)

    def __call__(self, x):
        h = self.activation(self.first(x[0] * x[1]))
        h = self.activation(self.hidden(h[self.permutation] * self.scale))
        return jnp.stack([self.last(h), jnp.sum(h * x[2])])


class CNN(eqx.Module):
    """Conv2d with strides and asymmetric padding, then with kernel dilation; outputs ``(2, 3)``."""

    convs: tuple
    out: eqx.nn.Linear

    def __init__(self, key, dtype):
        keys = jax.random.split(key, 3)
        self.convs = (eqx.nn.Conv2d(2, 4, 3, stride=2, padding=((1, 0), (2, 1)), key=keys[0], dtype=dtype),
                      eqx.nn.Conv2d(4, 3, 2, dilation=(2, 1), key=keys[1], dtype=dtype))
        self.out = eqx.nn.Linear(3 * 2 * 4, 6, key=keys[2], dtype=dtype)

    def __call__(self, x):
        x = jax.nn.relu(self.convs[0](x))
        return self.out(jnp.tanh(self.convs[1](x)).reshape(-1)).reshape(2, 3)


class Conv1d3d(eqx.Module):
    """Conv1d with "SAME" padding and no bias, and with "SAME_LOWER" padding and a stride; Conv3d with strides."""

    conv1d: tuple
    conv3d: eqx.nn.Conv3d
    out: eqx.nn.Linear

    def __init__(self, key, dtype):
        keys = jax.random.split(key, 4)
        self.conv1d = (eqx.nn.Conv1d(2, 3, 3, padding="SAME", use_bias=False, key=keys[0], dtype=dtype),
                       eqx.nn.Conv1d(3, 2, 2, stride=2, padding="SAME_LOWER", key=keys[1], dtype=dtype))
        self.conv3d = eqx.nn.Conv3d(1, 2, 2, stride=(1, 2, 2), key=keys[2], dtype=dtype)
        self.out = eqx.nn.Linear(2 * 4 + 2 * 3 * 2 * 2, 3, key=keys[3], dtype=dtype)

    def __call__(self, x):  # x: (2, 8), a signal, and as a volume (1, 4, 4, 4) of products of its values
        signal = self.conv1d[1](jnp.tanh(self.conv1d[0](x)))  # (2, 4)
        square = x.reshape(4, 4)
        volume = jnp.tanh(self.conv3d((square[:, :, None] * square[None, :, :])[None]))  # (2, 3, 2, 2)
        return self.out(jnp.concatenate([signal.reshape(-1), volume.reshape(-1)]))


class Embedding(eqx.Module):
    """One token id per sample: ``Embedding`` then ``Linear``."""

    embedding: eqx.nn.Embedding
    out: eqx.nn.Linear

    def __init__(self, key, dtype):
        keys = jax.random.split(key)
        self.embedding = eqx.nn.Embedding(11, 5, key=keys[0], dtype=dtype)
        self.out = eqx.nn.Linear(5, 3, key=keys[1], dtype=dtype)

    def __call__(self, token):
        return self.out(jnp.tanh(self.embedding(token)))


class Sequence(eqx.Module):
    """Layers vmapped over the tokens inside the model: exact through the fallback; outputs ``(T, 3)``."""

    embedding: eqx.nn.Embedding
    out: eqx.nn.Linear

    def __init__(self, key, dtype):
        keys = jax.random.split(key)
        self.embedding = eqx.nn.Embedding(11, 5, key=keys[0], dtype=dtype)
        self.out = eqx.nn.Linear(5, 3, key=keys[1], dtype=dtype)

    def __call__(self, tokens):
        return jax.vmap(self.out)(jnp.tanh(jax.vmap(self.embedding)(tokens)))


class Unsupported(eqx.Module):
    """A grouped convolution, circular padding and a ``Linear`` called twice: fall back, exactly; a plain ``Linear``
    beside them is still factorised."""

    grouped: eqx.nn.Conv1d
    circular: eqx.nn.Conv1d
    shared: eqx.nn.Linear
    out: eqx.nn.Linear

    def __init__(self, key, dtype):
        keys = jax.random.split(key, 4)
        self.grouped = eqx.nn.Conv1d(4, 4, 3, groups=2, key=keys[0], dtype=dtype)
        self.circular = eqx.nn.Conv1d(4, 2, 3, padding=1, padding_mode="CIRCULAR", key=keys[1], dtype=dtype)
        self.shared = eqx.nn.Linear(8, 8, key=keys[2], dtype=dtype)
        self.out = eqx.nn.Linear(8, 2, key=keys[3], dtype=dtype)

    def __call__(self, x):  # x: (4, 6)
        h = self.circular(jnp.tanh(self.grouped(x)))  # (2, 4)
        return self.out(self.shared(jnp.tanh(self.shared(h.reshape(-1)))))


class Batched(eqx.Module):
    """A module that takes the whole batch itself."""

    inner: eqx.Module

    def __call__(self, x):
        return jax.vmap(self.inner)(x)


def _mlp(key, dtype):
    return eqx.nn.MLP(4, 3, 6, 2, activation=jnp.tanh, key=key, dtype=dtype)


# name: (module factory, per-sample input shape, integer token vocabulary or None)
CASES = {"mlp": (_mlp, (4,), None), "custom": (Custom, (3,), None), "cnn": (CNN, (2, 8, 8), None),
         "conv1d3d": (Conv1d3d, (2, 8), None), "embedding": (Embedding, (), 11), "sequence": (Sequence, (4,), 11),
         "unsupported": (Unsupported, (4, 6), None)}
FACTORISED = {"mlp": ["dense"] * 3, "custom": ["dense"] * 3, "cnn": ["conv", "conv", "dense"],
              "conv1d3d": ["conv", "conv", "conv", "dense"], "embedding": ["embed", "dense"]}


def make_case(name, dtype):
    """``(module, x1, x2)`` in ``dtype``: 5 and 3 samples."""
    factory, shape, vocabulary = CASES[name]
    keys = jax.random.split(jax.random.key(0), 3)
    module = factory(keys[0], dtype)
    samples = zip(keys[1:], (5, 3), strict=True)
    if vocabulary is not None:
        return module, *(jax.random.randint(k, (n, *shape), 0, vocabulary) for k, n in samples)
    return module, *(jax.random.normal(k, (n, *shape), dtype) for k, n in samples)


def vmapped_by_hand(module):
    """An ``apply_fn`` independent of the adapter: the module recombined and vmapped over the batch."""
    params, static = eqx.partition(module, eqx.is_inexact_array)
    return params, lambda p, x: jax.vmap(eqx.combine(p, static))(x)


def trace_axes_settings(apply_fn, params, x):
    out_ndim = jax.eval_shape(apply_fn, params, x).ndim
    return [(-1,), ()] + ([tuple(range(1, out_ndim))] if out_ndim > 2 else [])


def coverage(model, x):
    f = canonical_fn(model.apply_fn, output_layout(model.apply_fn, model.params, x, ()))
    return structured.coverage(f, model.params, x)


@pytest.fixture
def float64():
    with jax.enable_x64(True):
        yield jnp.float64


# every model through the structured path and the generic Jacobian; ntvp and auto (which picks among them) on the
# models whose layers differ most, to keep the suite short
EXACTNESS = [(case, implementation) for case in CASES for implementation in ("jacobian", "structured")] + [
    ("cnn", "ntvp"), ("embedding", "ntvp"), ("sequence", "ntvp"), ("cnn", "auto"), ("custom", "auto")]


@pytest.mark.parametrize(("case", "implementation"), EXACTNESS)
def test_every_implementation_matches_the_dense_reference(case, implementation, float64):
    module, x1, x2 = make_case(case, float64)
    model = ntkcv.from_equinox(module)
    params, reference_fn = vmapped_by_hand(module)
    for trace_axes in trace_axes_settings(reference_fn, params, x1):
        kernel_fn = ntkcv.ntk_fn(model.apply_fn, trace_axes=trace_axes, implementation=implementation)
        for a, b in [(x1, None), (x1, x2)]:
            actual = kernel_fn(model.params, a, b)
            expected = reference_kernel(reference_fn, params, a, a if b is None else b, trace_axes)
            assert actual.shape == expected.shape and actual.dtype == jnp.float64
            assert relative_error(actual, expected) <= TOLERANCE["float64"], trace_axes
    diagonal = ntkcv.ntk_fn(model.apply_fn, trace_axes=(), implementation=implementation, diagonal=True)
    expected = reference_kernel(reference_fn, params, x1, x1, ())
    np.testing.assert_allclose(diagonal(model.params, x1), np.stack([expected[i, i] for i in range(5)]), rtol=1e-10,
                               atol=1e-12)


@pytest.mark.parametrize("case", ["mlp", "cnn"])
def test_structured_in_float32(case):
    module, x1, x2 = make_case(case, jnp.float32)
    model = ntkcv.from_equinox(module)
    params, reference_fn = vmapped_by_hand(module)
    actual = ntkcv.ntk_fn(model.apply_fn, implementation="structured")(model.params, x1, x2)
    assert actual.dtype == jnp.float32
    assert relative_error(actual, reference_kernel(reference_fn, params, x1, x2, (-1,))) <= TOLERANCE["float32"]


@pytest.mark.parametrize("case", FACTORISED)
def test_structured_factorises_every_linear_conv_and_embedding(case, float64):
    module, x1, _ = make_case(case, float64)
    cover = coverage(ntkcv.from_equinox(module), x1)
    assert cover.fallback == () and cover.fallback_size == 0
    assert [layer.kind for layer in cover.layers] == FACTORISED[case]
    assert all(layer.key.startswith("equinox/") for layer in cover.layers)


def test_debug_log_names_each_equinox_layer(float64, caplog):
    module, x1, _ = make_case("cnn", float64)
    with caplog.at_level(logging.DEBUG, logger="ntkcv.ntk"):
        cover = coverage(ntkcv.from_equinox(module), x1)
    assert [layer.key for layer in cover.layers] == ["equinox/convs/0", "equinox/convs/1", "equinox/out"]
    # T output positions, d = kernel size × input channels (+1 bias), h output channels
    assert ".convs[0].weight (conv equinox/convs/0, T=20 d=19 h=4)" in caplog.text
    assert ".convs[1].bias (conv equinox/convs/1, T=8 d=17 h=3)" in caplog.text
    assert ".out.weight (dense equinox/out, T=1 d=25 h=6)" in caplog.text
    assert "falls back" not in caplog.text


def test_unsupported_calls_fall_back_and_the_log_says_why(float64, caplog):
    module, x1, _ = make_case("unsupported", float64)
    with caplog.at_level(logging.DEBUG, logger="ntkcv.ntk"):
        cover = coverage(ntkcv.from_equinox(module), x1)
    assert [layer.key for layer in cover.layers] == ["equinox/out"]
    reasons = dict(cover.fallback)
    layers = ("grouped", "circular", "shared")
    assert set(reasons) == {f".{name}.{leaf}" for name in layers for leaf in ("weight", "bias")}
    assert "called 2 times" in reasons[".shared.weight"]
    assert "layer equinox/grouped is not factorised (has groups=2, padding_mode='ZEROS'" in caplog.text
    assert "layer equinox/circular is not factorised (has groups=1, padding_mode='CIRCULAR'" in caplog.text


def test_layers_vmapped_inside_the_model_fall_back(float64, caplog):
    module, tokens, _ = make_case("sequence", float64)
    with caplog.at_level(logging.DEBUG, logger="ntkcv.ntk"):
        cover = coverage(ntkcv.from_equinox(module), tokens)
    assert cover.layers == () and len(cover.fallback) == 3
    for key in ("equinox/embedding", "equinox/out"):
        assert f"layer {key} is not factorised (called inside a JAX transformation within the model" in caplog.text


def test_parameter_groups_match_the_dense_reference(float64):
    module, x1, x2 = make_case("cnn", float64)
    model = ntkcv.from_equinox(module)
    params, reference_fn = vmapped_by_hand(module)
    kernels = ntkcv.ntk_fn(model.apply_fn, implementation="structured", groups="layers")(model.params, x1, x2)
    assert sorted(kernels) == ["convs/0", "convs/1", "out"]
    for name, kernel in kernels.items():
        def keep(path, name=name):
            return jax.tree_util.keystr(path, simple=True, separator="/").startswith(f"{name}/")

        expected = reference_kernel(reference_fn, params, x1, x2, (-1,), keep)
        assert relative_error(kernel, expected) <= TOLERANCE["float64"], name


def test_adapter_partitions_and_maps_the_module_over_the_batch(float64):
    module, x1, _ = make_case("custom", float64)
    model = ntkcv.from_equinox(module)
    assert [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(model.params)] == [
        ".first.weight", ".first.bias", ".hidden.weight", ".last.weight", ".last.bias"]  # no int array, no function
    expected = jax.vmap(module)(x1)
    np.testing.assert_allclose(jax.jit(model.apply_fn)(model.params, x1), expected, rtol=1e-14)
    np.testing.assert_allclose(model.apply_fn(model.params, x1[:1]), expected[:1], rtol=1e-14)
    batched = ntkcv.from_equinox(Batched(module), batched=True)
    np.testing.assert_allclose(batched.apply_fn(batched.params, x1), expected, rtol=1e-14)


def test_the_users_module_is_left_untapped(float64):
    module, x1, _ = make_case("mlp", float64)
    model = ntkcv.from_equinox(module)
    ntkcv.ntk_fn(model.apply_fn, implementation="structured")(model.params, x1)
    assert all(type(layer) is eqx.nn.Linear for layer in (*module.layers, *model.params.layers))


def test_non_equinox_input_is_rejected():
    import flax.linen as nn

    with pytest.raises(TypeError, match=r"module must be an equinox\.Module, got Dense"):
        ntkcv.from_equinox(nn.Dense(3))
    with pytest.raises(TypeError, match=r"module must be an equinox\.Module, got function"):
        ntkcv.from_equinox(lambda x: x)


def test_missing_equinox_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "equinox", None)
    with pytest.raises(ImportError, match=r"pip install 'ntkcv\[equinox\]'"):
        ntkcv.from_equinox(object())
