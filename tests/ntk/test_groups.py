"""Group kernels Θ = Σ_g Θ_g: against the whole kernel and per-group dense ``jacrev`` references on the test models,
the default layer groups, user patterns and their errors, ``jit``, tiling and the diagonal."""

import logging

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ntkcv
from ntkcv.ntk import structured
from ntkcv.ntk.groups import partition
from ntkcv.ntk.layout import canonical_fn, output_layout
from tests.ntk.models import CASES, budget_for_tile, make_case, reference_kernel, relative_error

TOLERANCE = {"float32": 1e-6, "float64": 1e-10}
GROUPED = ("structured", "jacobian")


def _module(path) -> str:
    """The test models' layers are the top-level entries of params (linen dicts and NNX states alike)."""
    return path[0].key


def _references(model, x1, x2, trace_axes, group_of):
    """Per-group kernels from the dense Jacobian restricted to each group's leaves (``group_of(key_path)``)."""
    names = dict.fromkeys(group_of(path) for path, _ in jax.tree_util.tree_leaves_with_path(model.params))
    return {name: reference_kernel(model.apply_fn, model.params, x1, x2, trace_axes,
                                   keep=lambda path, name=name: group_of(path) == name) for name in names}


def _check(groups, whole, references, tolerance, dtype):
    assert set(groups) == set(references)
    for name, kernel in groups.items():
        assert kernel.dtype == dtype and kernel.shape == whole.shape
        assert relative_error(kernel, references[name]) <= tolerance, name
    total = sum(np.asarray(kernel, np.float64) for kernel in groups.values())
    assert relative_error(total, whole) <= tolerance
    assert relative_error(total, sum(references.values())) <= tolerance


@pytest.mark.parametrize("case", CASES)
def test_layer_groups_sum_to_the_kernel_and_match_per_group_references(case, dtype):
    model, x1, x2 = make_case(case, dtype)
    references = _references(model, x1, x2, (-1,), _module)
    for implementation in GROUPED:
        groups = ntkcv.ntk_fn(model.apply_fn, implementation=implementation, groups="layers")(model.params, x1, x2)
        whole = ntkcv.ntk_fn(model.apply_fn, implementation=implementation)(model.params, x1, x2)
        assert list(groups) == sorted(references)  # jit returns dicts sorted by key
        _check(groups, whole, references, TOLERANCE[np.dtype(dtype).name], dtype)


@pytest.mark.parametrize("trace_axes", [(), (1, 2)])
def test_group_kernels_with_kept_output_axes(trace_axes):
    with jax.enable_x64(True):
        model, x1, x2 = make_case("sequence", jnp.float64)  # outputs (N, T, 3)
        references = _references(model, x1, x2, trace_axes, _module)
        for implementation in (*GROUPED, "auto"):
            kernel_fn = ntkcv.ntk_fn(model.apply_fn, trace_axes=trace_axes, implementation=implementation,
                                     groups="layers")
            whole = ntkcv.ntk_fn(model.apply_fn, trace_axes=trace_axes)(model.params, x1, x2)
            _check(kernel_fn(model.params, x1, x2), whole, references, TOLERANCE["float64"], jnp.float64)


@pytest.mark.parametrize("case", ["cnn", "nnx"])
def test_grouped_diagonal_is_the_diagonal_of_each_group_kernel(case):
    model, x1, _ = make_case(case)
    for implementation in GROUPED:
        kernels = ntkcv.ntk_fn(model.apply_fn, implementation=implementation, groups="layers")(model.params, x1)
        diagonals = ntkcv.ntk_fn(model.apply_fn, implementation=implementation, groups="layers",
                                 diagonal=True)(model.params, x1)
        assert list(diagonals) == list(kernels)
        for name, kernel in kernels.items():
            np.testing.assert_allclose(diagonals[name], np.diagonal(kernel), rtol=1e-5, atol=1e-7)


def test_default_groups_are_the_layers():
    mlp, _, _ = make_case("mlp_tanh")
    assert ntkcv.parameter_groups(mlp.params) == {f"Dense_{i}": (f"Dense_{i}/bias", f"Dense_{i}/kernel")
                                                  for i in range(3)}
    nnx_model, _, _ = make_case("nnx")  # the `value` of each nnx.Param is not part of the path
    assert ntkcv.parameter_groups(nnx_model.params) == {
        "conv": ("conv/bias", "conv/kernel"), "norm": ("norm/bias", "norm/scale"), "out": ("out/bias", "out/kernel")}
    plain = {"encoder": {"block_0": {"w": jnp.ones(2), "b": jnp.ones(2)}}, "layers": [(jnp.ones(1), jnp.ones(1))],
             "scale": jnp.ones(3)}
    assert ntkcv.parameter_groups(plain) == {"encoder/block_0": ("encoder/block_0/b", "encoder/block_0/w"),
                                             "layers/0": ("layers/0/0", "layers/0/1"), "scale": ("scale",)}


def test_user_groups_by_patterns_in_the_order_given(dtype):
    model, x1, x2 = make_case("layernorm", dtype)
    groups = {"norm": "LayerNorm_*", "dense": ["Dense_0/*", "Dense_1/*"]}
    assert ntkcv.parameter_groups(model.params, groups) == {
        "norm": ("LayerNorm_0/bias", "LayerNorm_0/scale"),
        "dense": ("Dense_0/bias", "Dense_0/kernel", "Dense_1/bias", "Dense_1/kernel")}
    references = _references(model, x1, x2, (-1,), lambda path: "norm" if "LayerNorm" in path[0].key else "dense")
    whole = reference_kernel(model.apply_fn, model.params, x1, x2, (-1,))
    for implementation in GROUPED:
        kernels = ntkcv.ntk_fn(model.apply_fn, implementation=implementation, groups=groups)(model.params, x1, x2)
        _check(kernels, whole, references, TOLERANCE[np.dtype(dtype).name], dtype)


def _leaf_name(path) -> str:
    return path[1].key  # "kernel", "bias", "scale", "embedding"


@pytest.mark.parametrize("case", ["cnn", "nnx", "sequence"])
def test_a_layers_kernel_and_bias_in_different_groups(case):
    """The structured path keeps the kernel factorised and contracts the bias as a fallback leaf."""
    with jax.enable_x64(True):
        model, x1, x2 = make_case(case, jnp.float64)
        groups = {"weights": ["*kernel", "*embedding"], "offsets": ["*bias", "*scale"]}
        references = _references(model, x1, x2, (-1,),
                                 lambda path: "weights" if _leaf_name(path) in ("kernel", "embedding") else "offsets")
        whole = reference_kernel(model.apply_fn, model.params, x1, x2, (-1,))
        for implementation in GROUPED:
            kernel_fn = ntkcv.ntk_fn(model.apply_fn, implementation=implementation, groups=groups)
            _check(kernel_fn(model.params, x1, x2), whole, references, TOLERANCE["float64"], jnp.float64)
        f = canonical_fn(model.apply_fn, output_layout(model.apply_fn, model.params, x1, (-1,)))
        cover = structured.coverage(f, model.params, x1, partition(model.params, groups).leaf_groups)
        assert cover.layers and all(len(layer.leaves) == 1 for layer in cover.layers)
        assert any("bias in another parameter group than the kernel" in why for _, why in cover.fallback)


@settings(max_examples=6, deadline=None)
@given(assignment=st.lists(st.integers(0, 2), min_size=5, max_size=5), implementation=st.sampled_from(GROUPED))
def test_any_partition_of_the_leaves_sums_to_the_kernel(assignment, implementation):
    """Random groups of the sequence model's five leaves (Embed, two DenseGeneral kernels and biases)."""
    with jax.enable_x64(True):
        model, x1, x2 = make_case("sequence", jnp.float64)
        paths = [jax.tree_util.keystr(p, simple=True, separator="/")
                 for p, _ in jax.tree_util.tree_leaves_with_path(model.params)]
        names = {g: f"g{g}" for g in dict.fromkeys(assignment)}
        groups = {names[g]: [p for p, a in zip(paths, assignment, strict=True) if a == g] for g in names}
        group_of = dict(zip(paths, (names[a] for a in assignment), strict=True))
        references = _references(
            model, x1, x2, (-1,), lambda path: group_of[jax.tree_util.keystr(path, simple=True, separator="/")])
        kernels = ntkcv.ntk_fn(model.apply_fn, implementation=implementation, groups=groups)(model.params, x1, x2)
        whole = reference_kernel(model.apply_fn, model.params, x1, x2, (-1,))
        _check(kernels, whole, references, TOLERANCE["float64"], jnp.float64)


@pytest.mark.parametrize("implementation", GROUPED)
def test_tiled_group_kernels_equal_one_tile(implementation, caplog):
    model, _, _ = make_case("cnn")
    x1 = jax.random.normal(jax.random.key(1), (11, 8, 8, 2))
    x2 = jax.random.normal(jax.random.key(2), (7, 8, 8, 2))
    budget = budget_for_tile(model, x1, (-1,), implementation, 4, "layers")
    tiled = ntkcv.ntk_fn(model.apply_fn, implementation=implementation, groups="layers", memory_budget=budget)
    whole = ntkcv.ntk_fn(model.apply_fn, implementation=implementation, groups="layers")
    with caplog.at_level(logging.DEBUG, logger="ntkcv.ntk"):
        for b in (x2, None):
            expected = whole(model.params, x1, b)
            for name, kernel in tiled(model.params, x1, b).items():
                assert relative_error(kernel, expected[name]) <= 1e-6, name
    if implementation == "structured":  # each sample's features built once, contracted in tiles
        assert "features in tiles of" in caplog.text


def test_the_memory_model_counts_each_groups_kernel_block():
    """Each group keeps its own kernel block, so a tile of the group kernels needs more memory than one of Θ."""
    model, x, _ = make_case("mlp_tanh")
    budget = budget_for_tile(model, x, (-1,), "jacobian", 4)
    assert budget_for_tile(model, x, (-1,), "jacobian", 4, "layers") > budget


def test_group_kernels_under_jit_trace_once():
    model, x, _ = make_case("mlp_tanh")
    kernel_fn = ntkcv.ntk_fn(model.apply_fn, implementation="structured", groups="layers")

    @jax.jit
    @chex.assert_max_traces(n=1)
    def traces(params, x):
        return {name: jnp.trace(kernel) for name, kernel in kernel_fn(params, x).items()}

    first = traces(model.params, x)
    second = traces(jax.tree_util.tree_map(lambda a: 2 * a, model.params), x)
    assert list(first) == list(second) == ["Dense_0", "Dense_1", "Dense_2"]
    assert all(second[name] > first[name] for name in first)


@pytest.mark.parametrize("groups, error, message", [
    ("layer", ValueError, r"groups must be 'layers' or a mapping .*got 'layer'"),
    (["Dense_*"], TypeError, r"groups must be 'layers' or a mapping .*got list"),
    ({}, ValueError, "at least one group"),
    ({"": "*"}, TypeError, "names must be non-empty strings, got ''"),
    ({"dense": 3}, TypeError, r"groups\['dense'\] must be a pattern or a non-empty sequence of patterns.*got 3"),
    ({"dense": []}, TypeError, r"groups\['dense'\] must be a pattern"),
])
def test_malformed_groups_are_errors_at_construction(groups, error, message):
    with pytest.raises(error, match=message):
        ntkcv.ntk_fn(lambda p, x: x @ p["w"], groups=groups)


@pytest.mark.parametrize("groups, message", [
    ({"dense": "Dense_*"}, r"in none: 'LayerNorm_0/bias', 'LayerNorm_0/scale'"),
    ({"all": "*", "first": "Dense_0/*"}, r"in several: 'Dense_0/bias' \('all', 'first'\), 'Dense_0/kernel'"),
    ({"encoder": ["encoder/*", "enc_*"], "rest": "*"}, r"groups\['encoder'\] \('encoder/\*', 'enc_\*'\) matches no "
                                                       r"leaf of params; leaf paths: 'Dense_0/bias', "),
])
def test_patterns_that_drop_double_or_miss_leaves_are_errors(groups, message):
    model, x, _ = make_case("layernorm")
    with pytest.raises(ValueError, match=message):
        ntkcv.parameter_groups(model.params, groups)
    with pytest.raises(ValueError, match=message):
        ntkcv.ntk_fn(model.apply_fn, groups=groups)(model.params, x)


def test_ntvp_gives_no_groups_and_auto_does_not_pick_it(monkeypatch):
    with pytest.raises(ValueError, match=r"'ntvp' gives only the whole kernel; with groups use 'jacobian', "
                                         r"'structured' or 'auto'"):
        ntkcv.ntk_fn(lambda p, x: x @ p["w"], implementation="ntvp", groups="layers")
    from ntkcv.ntk import kernel, ntvp

    monkeypatch.setattr(ntvp, "flops", lambda *args: 0.0)  # the cheapest by far
    model, x, _ = make_case("mlp_tanh")
    chosen = []
    choose = kernel._choose
    monkeypatch.setattr(kernel, "_choose", lambda *args: chosen.append(choose(*args)) or chosen[-1])
    ntkcv.ntk_fn(model.apply_fn, groups="layers")(model.params, x)
    ntkcv.ntk_fn(model.apply_fn)(model.params, x)
    assert chosen == [kernel.Implementation.STRUCTURED, kernel.Implementation.NTVP]
