"""Every implementation against a dense ``jax.jacrev`` kernel on every test model."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntkcv
from ntkcv.ntk import tiling
from ntkcv.ntk.tiling import tiled_split_kernel
from tests.ntk.models import CASES, budget_for_tile, make_case, reference_kernel, relative_error

IMPLEMENTATIONS = ["jacobian", "ntvp", "structured", "auto"]
TOLERANCE = {"float32": 1e-5, "float64": 1e-10}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_traced_and_full_kernels_match_dense_reference(case, implementation, dtype):
    model, x1, x2 = make_case(case, dtype)
    out_ndim = jax.eval_shape(model.apply_fn, model.params, x1).ndim
    for trace_axes in [(-1,), ()] + ([tuple(range(1, out_ndim))] if out_ndim > 2 else []):
        kernel_fn = ntkcv.ntk_fn(model.apply_fn, trace_axes=trace_axes, implementation=implementation)
        for a, b in [(x1, None), (x1, x2)]:
            actual = kernel_fn(model.params, a, b)
            expected = reference_kernel(model.apply_fn, model.params, a, a if b is None else b, trace_axes)
            assert actual.shape == expected.shape
            assert actual.dtype == dtype
            assert relative_error(actual, expected) <= TOLERANCE[np.dtype(dtype).name], (case, trace_axes)


@pytest.mark.parametrize("implementation", ["jacobian", "ntvp", "structured"])
@pytest.mark.parametrize("trace_axes", [(-1,), ()])
def test_tiles_with_sizes_that_do_not_divide_n(implementation, trace_axes, dtype):
    model, _, _ = make_case("mlp_tanh", dtype)
    x1 = jax.random.normal(jax.random.key(1), (11, 6), dtype)
    x2 = jax.random.normal(jax.random.key(2), (7, 6), dtype)
    whole = ntkcv.ntk_fn(model.apply_fn, trace_axes=trace_axes, implementation=implementation)
    # a budget that fits a 3 x 3 tile of this model but not 4 x 4 (the plan picks the largest square tile)
    kernel_fn = ntkcv.ntk_fn(model.apply_fn, trace_axes=trace_axes, implementation=implementation,
                             memory_budget=budget_for_tile(model, x1, trace_axes, implementation, 3))
    expected = reference_kernel(model.apply_fn, model.params, x1, x2, trace_axes)
    assert relative_error(kernel_fn(model.params, x1, x2), expected) <= TOLERANCE[np.dtype(dtype).name]
    np.testing.assert_allclose(kernel_fn(model.params, x1), whole(model.params, x1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["mlp_tanh", "cnn", "sequence", "nnx"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_diagonal_mode_equals_diagonal_of_full_kernel(case, implementation, dtype):
    model, x1, _ = make_case(case, dtype)
    for trace_axes in [(-1,), ()]:
        full = ntkcv.ntk_fn(model.apply_fn, trace_axes=trace_axes, implementation=implementation)(model.params, x1)
        diag = ntkcv.ntk_fn(model.apply_fn, trace_axes=trace_axes, implementation=implementation,
                            diagonal=True)(model.params, x1)
        n = x1.shape[0]
        expected = np.stack([np.asarray(full)[i, i] for i in range(n)])
        assert diag.shape == expected.shape
        np.testing.assert_allclose(diag, expected, rtol=1e-5, atol=1e-7)


def test_diagonal_mode_never_builds_the_n_by_n_kernel():
    """Compiled memory of the diagonal grows linearly in N: at N=2048 an N x N float32 kernel would be 16 MiB."""
    model, _, _ = make_case("mlp_tanh")
    x = jax.random.normal(jax.random.key(0), (2048, 6))
    diagonal_fn = ntkcv.ntk_fn(model.apply_fn, diagonal=True, implementation="jacobian")
    memory = jax.jit(diagonal_fn).lower(model.params, x).compile().memory_analysis()
    assert memory.temp_size_in_bytes + memory.output_size_in_bytes < 2048 * 2048 * 4 / 4


@pytest.mark.parametrize("trace_axes", [(-1,), ()])
def test_structured_builds_each_sample_once_when_tiled(trace_axes, dtype, caplog):
    """A budget below one whole tile: per-sample features in tiles (not dividing N), then contracted."""
    model, _, _ = make_case("cnn", dtype)
    x1 = jax.random.normal(jax.random.key(1), (11, 8, 8, 2), dtype)
    x2 = jax.random.normal(jax.random.key(2), (7, 8, 8, 2), dtype)
    budget = budget_for_tile(model, x1, trace_axes, "structured", 4)
    kernel_fn = ntkcv.ntk_fn(model.apply_fn, trace_axes=trace_axes, implementation="structured", memory_budget=budget)
    with caplog.at_level(logging.DEBUG, logger="ntkcv.ntk"):
        cross, same = kernel_fn(model.params, x1, x2), kernel_fn(model.params, x1)
    assert "features in tiles of" in caplog.text
    tolerance = TOLERANCE[np.dtype(dtype).name]
    assert relative_error(cross, reference_kernel(model.apply_fn, model.params, x1, x2, trace_axes)) <= tolerance
    assert relative_error(same, reference_kernel(model.apply_fn, model.params, x1, x1, trace_axes)) <= tolerance


def test_split_tiler_builds_features_once_and_contracts_in_tiles():
    x1, x2 = np.random.default_rng(0).normal(size=(11, 3)), np.random.default_rng(1).normal(size=(7, 3))
    built = []

    def features_fn(x):
        built.append(x.shape[0])
        return {"rows": x, "norms": jnp.sum(x**2, axis=1)}

    def contract_fn(a, b):
        return (a["rows"] @ b["rows"].T + a["norms"][:, None] * b["norms"][None, :])[:, :, None, None]  # (b1, b2, O, O)

    expected = x1 @ x2.T + np.sum(x1**2, 1)[:, None] * np.sum(x2**2, 1)[None, :]
    kernel = tiled_split_kernel(features_fn, contract_fn, jnp.asarray(x1), jnp.asarray(x2), 4, (3, 5))
    np.testing.assert_allclose(kernel[:, :, 0, 0], expected, rtol=1e-5, atol=1e-5)
    assert built in ([4], [4, 4])  # traced once (per input set at most), never per contraction tile
    same = tiled_split_kernel(features_fn, contract_fn, jnp.asarray(x1), None, 5, (4, 4))
    norms = np.sum(x1**2, 1)
    np.testing.assert_allclose(same[:, :, 0, 0], x1 @ x1.T + np.outer(norms, norms), rtol=1e-5, atol=1e-5)


def test_a_kernel_of_one_input_set_computes_only_the_tiles_on_and_above_the_diagonal():
    """Three tiles a side, the last overlapping: 6 tiles computed (3 of them against themselves, passed ``None``),
    the 3 below the diagonal filled by transposing, with the output axes swapped."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(11, 3)))
    weights = jnp.asarray(np.random.default_rng(1).normal(size=(3, 2, 4)))
    calls = []

    def tile_fn(a, b):  # Σ_k φ_ok(a) φ_qk(b): Θ(b, a)_{qo} = Θ(a, b)_{oq}, but not symmetric in (o, q)
        calls.append(b is None)
        features = lambda x: jnp.tanh(jnp.einsum("ad,dok->aok", x, weights))  # noqa: E731
        return (jnp.einsum("aok,bqk->aboq", features(a), features(a if b is None else b)),)

    (kernel,) = tiling.tiled_kernel(tile_fn, x, None, (4, 4))
    # the first call gives the blocks' shapes; then the row of tiles from 0 (against itself, 4, 7), from 4, from 7
    assert calls == [False, True, False, False, True, False, True]
    (expected,) = tile_fn(x, x)
    np.testing.assert_allclose(kernel, expected, rtol=1e-5, atol=1e-6)
