"""The ``jacobian`` implementation when all Jacobians do not fit the memory budget: chunks of leaves, each sample's
Jacobians built once per chunk, then contracted; a leaf too large for one chunk cut into slices of its parameters."""

import logging
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import ntkcv
from ntkcv.ntk import elementwise, jacobian, tiling
from ntkcv.ntk.layout import canonical_fn, output_layout
from ntkcv.ntk.profile import profile_model
from ntkcv.ntk.validate import check_params
from tests.ntk.models import make_case, reference_kernel, relative_error

TOLERANCE = {"float32": 1e-5, "float64": 1e-10}
_CHUNK = re.compile(r"jacobian: features in tiles of (\d+), contraction in .* tiles \(chunk \d+ of (\d+)\)")
_SLICED = re.compile(r"jacobian: leaf (\d+) \((\d+) parameters\) cut into (\d+) slices")


def _profile(model, x, trace_axes):
    layout = output_layout(model.apply_fn, model.params, x, trace_axes)
    f = canonical_fn(model.apply_fn, layout)
    profile = profile_model(f, model.params, x, layout.kept_size, layout.traced_size, check_params(model.params))
    return profile, max(leaf.size for leaf in jax.tree_util.tree_leaves(model.params))


def _chunked_budget(model, x, trace_axes, samples) -> int:
    """A budget whose half holds the largest leaf's Jacobians of all ``samples`` (what one chunk may store) beside one
    sample's work, but not all leaves' Jacobians: at least two chunks."""
    profile, largest = _profile(model, x, trace_axes)
    stored, build_bytes, contract_bytes = jacobian.split_bytes(profile, samples, samples, num_params=largest)
    total = samples * jacobian.split_bytes(profile, samples, samples)[0]
    budget = max(2 * samples * stored, samples * stored + max(build_bytes(1), contract_bytes(1, 1))) + 2
    assert budget // 2 < total
    return budget


def _sliced_budget(model, x, trace_axes, samples) -> int:
    """A budget whose half does not hold the largest leaf's Jacobians of all ``samples``, but half of them beside one
    sample's work (its whole gradient formed before it is sliced): the leaf is cut in two slices."""
    profile, largest = _profile(model, x, trace_axes)
    stored, build_bytes, contract_bytes = jacobian.split_bytes(profile, samples, samples, num_params=largest,
                                                               sliced_params=largest)
    work = max(build_bytes(1), contract_bytes(1, 1))
    assert samples * stored > 2 * work
    return samples * stored + 2 * work


def _chunks(log: str) -> list[tuple[int, int]]:
    """``(chunk count, feature tile)`` of each chunk the debug log reports."""
    return [(int(count), int(tile)) for tile, count in _CHUNK.findall(log)]


@pytest.mark.parametrize(("trace_axes", "groups"), [((-1,), None), ((), "layers")])
def test_chunked_kernel_equals_untiled_and_reference(trace_axes, groups, dtype, caplog):
    model, _, _ = make_case("mlp_tanh", dtype)
    x1 = jax.random.normal(jax.random.key(1), (9, 6), dtype)
    x2 = jax.random.normal(jax.random.key(2), (4, 6), dtype)
    budget = _chunked_budget(model, x1, trace_axes, x1.shape[0] + x2.shape[0])
    small = ntkcv.ntk_fn(model.apply_fn, trace_axes=trace_axes, implementation="jacobian", groups=groups,
                         memory_budget=budget)
    whole = ntkcv.ntk_fn(model.apply_fn, trace_axes=trace_axes, implementation="jacobian", groups=groups)
    tolerance = TOLERANCE[np.dtype(dtype).name]
    for a, b in [(x1, None), (x1, x2)]:
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="ntkcv.ntk"):
            chunked = small(model.params, a, b)
        assert len(_chunks(caplog.text)) >= 2
        untiled = whole(model.params, a, b)
        if groups is None:
            chunked, untiled = {"all": chunked}, {"all": untiled}
        paths = ntkcv.parameter_groups(model.params, groups) if groups else {"all": None}
        for name, leaves in paths.items():
            keep = None if leaves is None else (lambda path, leaves=leaves: jax.tree_util.keystr(
                path, simple=True, separator="/") in leaves)
            expected = reference_kernel(model.apply_fn, model.params, a, a if b is None else b, trace_axes, keep)
            assert relative_error(chunked[name], expected) <= tolerance, (name, b is None)
            np.testing.assert_allclose(chunked[name], untiled[name], rtol=10 * tolerance, atol=tolerance)


@pytest.mark.parametrize(("trace_axes", "groups"), [((-1,), None), ((), "layers")])
def test_sliced_leaves_give_the_reference_kernel(trace_axes, groups, dtype, caplog):
    """A budget too small for the largest leaf's Jacobians: the leaf is cut into slices of its parameters, still on
    the path that builds each sample's Jacobians once per chunk (not in tiles that each build their own)."""
    model, _, _ = make_case("mlp_tanh", dtype)
    x1 = jax.random.normal(jax.random.key(1), (9, 6), dtype)
    x2 = jax.random.normal(jax.random.key(2), (4, 6), dtype)
    sizes = [leaf.size for leaf in jax.tree_util.tree_leaves(model.params)]
    for a, b in [(x1, None), (x1, x2)]:
        budget = _sliced_budget(model, x1, trace_axes, a.shape[0] + (0 if b is None else b.shape[0]))
        kernel_fn = ntkcv.ntk_fn(model.apply_fn, trace_axes=trace_axes, implementation="jacobian", groups=groups,
                                 memory_budget=budget)
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="ntkcv.ntk"):
            kernel = kernel_fn(model.params, a, b)
        sliced = [(int(leaf), int(size), int(count)) for leaf, size, count in _SLICED.findall(caplog.text)]
        assert (sizes.index(max(sizes)), max(sizes), 2) in sliced
        assert len(_chunks(caplog.text)) >= 2
        kernels = kernel if groups else {"all": kernel}
        paths = ntkcv.parameter_groups(model.params, groups) if groups else {"all": None}
        for name, leaves in paths.items():
            keep = None if leaves is None else (lambda path, leaves=leaves: jax.tree_util.keystr(
                path, simple=True, separator="/") in leaves)
            expected = reference_kernel(model.apply_fn, model.params, a, a if b is None else b, trace_axes, keep)
            assert relative_error(kernels[name], expected) <= TOLERANCE[np.dtype(dtype).name], (name, b is None)


def test_each_sample_is_evaluated_once_per_chunk(caplog):
    """A host callback in the model counts its evaluations: each chunk of leaves evaluates each sample once (its last
    feature tile ends at the last sample, overlapping the tile before), never once per contraction tile."""
    model, _, _ = make_case("mlp_tanh")
    evaluated = []

    def apply_fn(params, x):
        jax.debug.callback(lambda batch: evaluated.append(batch.shape[0]), x)
        return model.apply_fn(params, x)

    x = jax.random.normal(jax.random.key(1), (11, 6))
    kernel_fn = ntkcv.ntk_fn(apply_fn, implementation="jacobian",
                             memory_budget=_chunked_budget(model, x, (-1,), x.shape[0]))
    with caplog.at_level(logging.DEBUG, logger="ntkcv.ntk"):
        kernel = jax.block_until_ready(kernel_fn(model.params, x))
    chunks = _chunks(caplog.text)
    assert len(chunks) >= 2
    n = x.shape[0]
    assert sum(evaluated) == sum(math.ceil(n / tile) * tile for _, tile in chunks)
    assert sum(evaluated) < len(chunks) * (n + max(tile for _, tile in chunks))
    assert relative_error(kernel, reference_kernel(model.apply_fn, model.params, x, x, (-1,))) <= 1e-5


@pytest.mark.parametrize(("share", "looped"), [(2, False), (4, False), (4, True)])
def test_chunks_stay_within_the_memory_budget(share, looped, caplog, monkeypatch):
    """XLA's compiled temporary memory of a kernel whose Jacobians take ``share`` times the budget (4: each large
    leaf's Jacobians take more than half of it, so the leaves are cut into slices), with each chunk's tiles unrolled
    or in loops (whose buffers XLA must not allocate before the chunk before them is done)."""
    if looped:
        monkeypatch.setattr(tiling, "_UNROLLED", 1)
    shapes = [(50, 50)] * 5 + [(50, 3)]  # each leaf's Jacobians under a quarter of all: half the budget holds one
    keys = jax.random.split(jax.random.key(0), len(shapes))
    params = [jax.random.normal(key, shape) / shape[0] ** 0.5 for key, shape in zip(keys, shapes, strict=True)]

    def apply_fn(p, x):
        for w in p[:-1]:
            x = jnp.tanh(x @ w)
        return x @ p[-1]

    x = jax.random.normal(keys[0], (64, 50))
    all_jacobians = x.shape[0] * 3 * sum(leaf.size for leaf in jax.tree_util.tree_leaves(params)) * 4
    kernel_fn = ntkcv.ntk_fn(apply_fn, implementation="jacobian", memory_budget=all_jacobians // share)
    with caplog.at_level(logging.DEBUG, logger="ntkcv.ntk"):
        memory = kernel_fn.lower(params, x).compile().memory_analysis()
    chunks = _chunks(caplog.text)
    assert len(chunks) >= 2 and any(tile < x.shape[0] for _, tile in chunks) == (share > 2)
    assert bool(_SLICED.findall(caplog.text)) == (share > 2)
    assert memory.temp_size_in_bytes <= all_jacobians // share


@pytest.mark.parametrize(("sizes", "expected"), [
    ([4, 5, 3, 7, 10, 1], [(0, 1), (2, 3), (4,), (5,)]), ([4, 11, 3], None), ([2, 3], [(0, 1)])])
def test_chunks_are_consecutive_and_fit(sizes, expected):
    assert tiling.plan_chunks(len(sizes), lambda chunk: sum(sizes[u] for u in chunk) <= 10) == expected


@given(sizes=st.lists(st.integers(0, 50), min_size=1, max_size=6), limit=st.integers(1, 20))
def test_parts_cover_each_leaf_in_the_fewest_slices_that_fit(sizes, limit):
    parts = tiling.plan_parts(sizes, lambda unit, count: count <= limit or count == sizes[unit] == limit + 1)
    for unit, size in enumerate(sizes):
        own = [(start, stop) for u, start, stop in parts if u == unit]
        assert [start for start, _ in own] == [0] + [stop for _, stop in own[:-1]] and own[-1][1] == size
        if size == limit + 1:  # fits whole, though not as a slice of that size
            assert own == [(0, size)]
        else:
            assert max(stop - start for start, stop in own) <= limit and len(own) == max(1, math.ceil(size / limit))


def test_parts_are_none_when_one_parameter_does_not_fit():
    assert tiling.plan_parts([3, 0, 5], lambda unit, count: count > 1 and count == 3) is None


def test_leaves_are_ordered_as_the_model_reads_them():
    """Tree order (alphabetical) is not the order of the layers; a jitted inner function is looked into."""
    params = {"a_last": jnp.ones((3, 2)), "b_first": jnp.ones((4, 3)), "c_unused": jnp.ones(5)}
    inner = jax.jit(lambda p, x: jnp.tanh(x @ p["b_first"]))

    def apply_fn(leaves, x):
        p = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), leaves)
        return inner(p, x) @ p["a_last"]

    jaxpr = jax.make_jaxpr(apply_fn)(jax.tree_util.tree_leaves(params), jnp.ones((1, 4)))
    assert elementwise.read_order(jaxpr, range(3)) == [1, 0, 2]


def test_contraction_is_one_matrix_product_without_copies():
    """XLA lowers a contraction over several axes (``"aorp,bqrp->aboq"``) with a transposed copy of each Jacobian;
    :func:`jacobian.contract_leaf` multiplies the Jacobians as they are stored: nothing of their size is copied."""
    j1, j2 = jax.ShapeDtypeStruct((6, 2, 3, 50, 40), jnp.float32), jax.ShapeDtypeStruct((4, 2, 3, 50, 40), jnp.float32)
    entry = jax.jit(jacobian.contract_leaf).lower(j1, j2).compile().as_text().split("ENTRY")[1]
    moved = [line for line in entry.splitlines() if re.search(r"kind=kLoop| copy\(| transpose\(", line)]
    sizes = [math.prod(int(d) for d in re.search(r"f32\[([\d,]*)\]", line).group(1).split(",")) for line in moved]
    assert moved and max(sizes) <= 4 * 6 * 2 * 2  # only the (N₁, N₂, O, O) kernel is reordered
