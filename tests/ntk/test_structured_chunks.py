"""The ``structured`` implementation when all samples' features do not fit the memory budget: chunks of units (the
leaves taken as per-sample gradients, then the covered layers), each sample's features built once per chunk; weight
gradients deferred to the contraction; and the programs compiled for the CPU without XLA's YNNPACK fusions."""

import logging
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntkcv
from ntkcv.ntk import structured, tiling
from ntkcv.ntk.compilation import ntk_compile_options
from ntkcv.ntk.layout import canonical_fn, output_layout
from ntkcv.ntk.profile import profile_model
from ntkcv.ntk.validate import check_params
from tests.ntk.models import make_case, reference_kernel, relative_error


@pytest.fixture
def float64():
    with jax.enable_x64(True):
        yield


_CHUNK = re.compile(r"structured: features in tiles of (\d+), contraction in .* tiles \(chunk \d+ of (\d+)\)")


def _chunked_budget(model, x, trace_axes, samples) -> int:
    """A budget that holds the largest unit's features of all samples beside one sample's work, and half of it less
    than all units' features: at least two chunks."""
    layout = output_layout(model.apply_fn, model.params, x, trace_axes)
    f = canonical_fn(model.apply_fn, layout)
    profile = profile_model(f, model.params, x, layout.kept_size, layout.traced_size, check_params(model.params))
    cover = structured.coverage(f, model.params, x)
    stored = [samples * structured.split_bytes(profile, samples, samples, cover, same=False, chunk=(u,))[0]
              for u in range(structured.units(cover))]
    _, build_bytes, contract_bytes = structured.split_bytes(profile, samples, samples, cover, same=False)
    budget = max(stored) + build_bytes(1) + contract_bytes(1, 1)
    assert budget // 2 < sum(stored)
    return budget


@pytest.mark.parametrize(("case", "trace_axes", "groups"), [("batchnorm", (-1,), None), ("cnn", (), "layers")])
@pytest.mark.usefixtures("float64")
def test_chunked_structured_kernel_equals_reference(case, trace_axes, groups, caplog):
    model, x1, _ = make_case(case, jnp.float64)
    for a, b in [(x1, None)]:
        budget = _chunked_budget(model, x1, trace_axes, a.shape[0])
        kernel_fn = ntkcv.ntk_fn(model.apply_fn, trace_axes=trace_axes, implementation="structured", groups=groups,
                                 memory_budget=budget)
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="ntkcv.ntk"):
            kernels = kernel_fn(model.params, a, b)
        counts = {int(count) for _, count in _CHUNK.findall(caplog.text)}
        assert counts and min(counts) >= 2, caplog.text[-2000:]
        if groups is None:
            kernels = {"all": kernels}
        paths = ntkcv.parameter_groups(model.params, groups) if groups else {"all": None}
        for name, leaves in paths.items():
            keep = None if leaves is None else (lambda path, leaves=leaves: jax.tree_util.keystr(
                path, simple=True, separator="/") in leaves)
            expected = reference_kernel(model.apply_fn, model.params, a, a if b is None else b, trace_axes, keep)
            assert relative_error(kernels[name], expected) < 1e-10, name


class _Deep(nn.Module):
    """Two convolutions whose inputs and cotangents are smaller than their weight gradients (deferred when traced)."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = nn.relu(nn.Conv(24, (3, 3), strides=(2, 2))(x))
        x = jnp.tanh(nn.Conv(24, (3, 3))(x))
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


def _deep(samples=6):
    x = jax.random.normal(jax.random.key(1), (samples, 8, 8, 2), jnp.float64)
    module = _Deep()
    with jax.numpy_dtype_promotion("standard"):  # flax's float32 parameters meet float64 inputs; cast after
        variables = module.init(jax.random.key(0), x)
    variables = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), variables)
    return ntkcv.from_linen(module, variables), x


def _parts(model, x, trace_axes):
    layout = output_layout(model.apply_fn, model.params, x, trace_axes)
    f = canonical_fn(model.apply_fn, layout)
    profile = profile_model(f, model.params, x, layout.kept_size, layout.traced_size, check_params(model.params))
    return layout, f, profile, structured.coverage(f, model.params, x, None)


@pytest.mark.parametrize(("trace_axes", "tiles", "other"),
                         [((-1,), (6, 6), False), ((), (6, 6), False), ((-1,), (4, 3), False), ((-1,), (6, 6), True)])
@pytest.mark.usefixtures("float64")
def test_deferred_weight_gradients_give_the_reference_kernel(trace_axes, tiles, other):
    """Weight gradients formed per contraction tile from stored inputs and cotangents: one tile of ``x₂ = x₁``
    (formed once for both sides), several tiles, and a second input set."""
    model, x = _deep()
    x2 = x[::-1] * 0.5 + 0.1 if other else None
    layout, f, _, cover = _parts(model, x, trace_axes)
    n2 = x.shape[0] if x2 is None else x2.shape[0]
    features_fn, contract_fn = structured.split_fn(f, model.params, x, x.shape[0], n2, same=x2 is None, cover=cover,
                                                   defer=True)
    plan = cover.plan
    routes = structured._routes(plan, x.shape[0], n2, same=x2 is None)
    assert structured._deferred(plan, routes), routes
    (kernel,) = tiling.tiled_split_kernel(features_fn, contract_fn, x, x2, 3, tiles)
    expected = reference_kernel(model.apply_fn, model.params, x, x if x2 is None else x2, trace_axes)
    assert relative_error(layout.unflatten_kernel(kernel), expected) < 1e-10


@pytest.mark.usefixtures("float64")
def test_weight_gradients_are_deferred_when_that_saves_chunks(caplog):
    """A budget that holds every sample's deferred features but not their weight gradients: one chunk, not three,
    and XLA's compiled working memory within it."""
    model, x = _deep()
    n = x.shape[0]
    _, _, profile, cover = _parts(model, x, (-1,))
    sizes = {defer: structured.split_bytes(profile, n, n, cover, same=True, defer=defer) for defer in (False, True)}
    stored, build_bytes, contract_bytes = sizes[True]
    budget = max(2 * n * stored, n * stored + build_bytes(1) + contract_bytes(1, 1))
    assert budget // 2 < n * sizes[False][0] and structured.tile_bytes(profile, n, n, cover) > budget
    kernel_fn = ntkcv.ntk_fn(model.apply_fn, implementation="structured", memory_budget=budget)
    with caplog.at_level(logging.DEBUG, logger="ntkcv.ntk"):
        compiled = kernel_fn.lower(model.params, x).compile()
    kernel = compiled(model.params, x)
    assert compiled.memory_analysis().temp_size_in_bytes <= budget
    assert {int(count) for _, count in _CHUNK.findall(caplog.text)} == {1}, caplog.text[-2000:]
    assert caplog.text.count("weight gradients formed per tile") == 2
    assert relative_error(kernel, reference_kernel(model.apply_fn, model.params, x, x, (-1,))) < 1e-10


@pytest.mark.usefixtures("float64")
def test_deferral_costs_the_weight_gradients_formed_again_per_tile():
    """Tiles of 4 over 6 samples of one input set: tiles (0, 0), (0, 2), (2, 2); the diagonal ones form 4 samples'
    weight gradients, the other 8: 16 instead of 6. A chunk's backward pass stops at its first layer."""
    model, x = _deep()
    _, _, profile, cover = _parts(model, x, (-1,))
    routes = structured._routes(cover.plan, 6, 6, same=True)
    per_sample = profile.traced * sum(layer.positions * layer.in_size * layer.out_size
                                      for layer in structured._deferred(cover.plan, routes))
    assert structured.deferral_macs(profile, 6, 6, cover, (6, 6), same=True) == 0
    assert structured.deferral_macs(profile, 6, 6, cover, (4, 4), same=True) == 10 * per_sample > 0
    work = [layer.positions * layer.in_size * layer.out_size for layer in cover.plan.layers]
    assert structured.backward_share(cover, (0, 1)) == 1.0
    assert structured.backward_share(cover, (3,)) == pytest.approx(work[3] / sum(work))


def test_chunks_run_one_after_the_other_and_add_exactly():
    """Each chunk's inputs wait for the previous chunks' sum through an exact zero, also when that sum is not
    finite."""
    x = jnp.arange(6.0).reshape(3, 2)
    for value in (jnp.array([[jnp.nan, 1.0]]), jnp.array([[jnp.inf]]), jnp.array([[2.0]])):
        assert np.array_equal(tiling.after(value, x), x)
    ids = jnp.arange(4, dtype=jnp.int32)
    assert tiling.after(jnp.array([jnp.nan]), ids).dtype == jnp.int32

    def features(x):
        return x

    def contract(f1, f2):
        return (f1 @ f2.T,)

    chunks = [(features, contract, 2, (3, 3))] * 3
    assert np.allclose(tiling.tiled_split_chunks(chunks, x, None)[0], 3 * x @ x.T)


@pytest.mark.skipif(not ntk_compile_options(), reason="options for XLA's CPU backend")
def test_kernel_programs_are_compiled_without_ynnpack_fusions_and_still_nest_in_jit():
    model, x, _ = make_case("cnn")
    kernel_fn = ntkcv.ntk_fn(model.apply_fn)
    text = kernel_fn.lower(model.params, x).compile().as_text()
    assert "ynn_fusion" not in text, re.findall(r".{150}ynn_fusion.{60}", text)[:1]
    nested = jax.jit(lambda params, x: kernel_fn(params, x) * 2)(model.params, x)
    assert relative_error(nested, 2 * kernel_fn(model.params, x)) < 1e-5
