"""The structured (layer-factorised) kernel against a dense ``jax.jacrev`` kernel, and its coverage."""

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ntkcv
from ntkcv.ntk import structured
from ntkcv.ntk.layout import canonical_fn, output_layout
from tests.ntk.models import CASES, dense_jacobian, make_case, relative_error

TOLERANCE = {"float32": 1e-5, "float64": 1e-10}
FLOAT32_CASES = ("mlp_tanh", "cnn", "sequence", "nnx")


def _reference(j1, j2, trace_axes):
    """Θ from dense Jacobians ``(N, *out, P)``: traced axes summed, kept axes zipped ``(N1, N2, k, k, …)``."""
    out_ndim = j1.ndim - 1
    traced = {a % out_ndim for a in trace_axes}
    letters = "cdefghijkl"
    sub1 = "a" + "".join(letters[i] for i in range(1, out_ndim))
    sub2 = "b" + "".join(letters[i] if i in traced else letters[i].upper() for i in range(1, out_ndim))
    kept = "".join(letters[i] + letters[i].upper() for i in range(1, out_ndim) if i not in traced)
    return np.einsum(f"{sub1}z,{sub2}z->ab{kept}", j1, j2)


def _tiles(model, trace_axes, x1, x2):
    """Θ(x₁, x₁), Θ(x₁, x₂) and the diagonal from the tile functions, in one jitted call."""
    layout = output_layout(model.apply_fn, model.params, x1, trace_axes)
    f = canonical_fn(model.apply_fn, layout)

    @jax.jit
    def tiles(params, a, b):
        kernel = lambda b: layout.unflatten_kernel(*structured.kernel_tile(f, params, a, b))  # noqa: E731
        return kernel(None), kernel(b), layout.unflatten_diagonal(*structured.diagonal_tile(f, params, a))

    return tiles(model.params, x1, x2)


def coverage_of(model, x):
    f = canonical_fn(model.apply_fn, output_layout(model.apply_fn, model.params, x, (-1,)))
    return structured.coverage(f, model.params, x)


def check_tiles(model, x1, x2, dtype, trace_axes_list=None):
    """Kernel (x2 = x1 and x2 ≠ x1) and diagonal per trace-axes setting; float32 checks the first only."""
    out_ndim = jax.eval_shape(model.apply_fn, model.params, x1).ndim
    if trace_axes_list is None:
        trace_axes_list = [(-1,), ()] + ([tuple(range(1, out_ndim))] if out_ndim > 2 else [])
    if dtype == jnp.float32:  # keeps the file fast; float64 checks every mode at the tight tolerance
        trace_axes_list = trace_axes_list[:1]
    tolerance = TOLERANCE[np.dtype(dtype).name]
    # both inputs in one batch (samples are independent), the model jitted: one compilation instead of an eager trace
    jac = dense_jacobian(jax.jit(model.apply_fn), model.params, jnp.concatenate([x1, x2]))
    j1, j2 = jac[: x1.shape[0]], jac[x1.shape[0]:]
    for trace_axes in trace_axes_list:
        same, cross, diagonal = _tiles(model, trace_axes, x1, x2)
        expected_same = _reference(j1, j1, trace_axes)
        for actual, expected in [(same, expected_same), (cross, _reference(j1, j2, trace_axes)),
                                 (diagonal, np.stack([expected_same[i, i] for i in range(x1.shape[0])]))]:
            assert actual.shape == expected.shape
            assert actual.dtype == dtype
            assert relative_error(actual, expected) <= tolerance, trace_axes


@pytest.mark.parametrize("case", CASES)
def test_tiles_match_dense_reference(case, dtype):
    if dtype == jnp.float32 and case not in FLOAT32_CASES:
        pytest.skip("float32 rounding is checked on one model per layer kind")
    model, x1, x2 = make_case(case, dtype)
    check_tiles(model, x1, x2, dtype)


class Variants(nn.Module):
    """Conv strides, input dilation, circular padding and an extra batch axis; DenseGeneral over 2 axes."""

    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Conv(3, (2, 3), strides=(1, 2), input_dilation=(2, 1), padding=1)(x))
        x = jnp.tanh(nn.Conv(2, (3, 3), padding="CIRCULAR", kernel_dilation=2, use_bias=False)(x))
        x = nn.Conv(2, (3,), padding="CAUSAL")(x.reshape(x.shape[:2] + (-1,)))  # 1-D over rows
        x = nn.Conv(2, (3, 3), feature_group_count=2)(x[..., None].repeat(2, -1))  # grouped: falls back
        return nn.DenseGeneral(3, axis=(-3, -1))(x)


def test_conv_and_dense_general_variants(dtype):
    if dtype == jnp.float32:
        pytest.skip("float64 only: the variants exercise index bookkeeping, not rounding")
    module = Variants()
    k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
    x1, x2 = jax.random.normal(k1, (3, 5, 6, 2), dtype), jax.random.normal(k2, (2, 5, 6, 2), dtype)
    with jax.numpy_dtype_promotion("standard"):  # flax's float32 parameters meet float64 inputs; cast after
        variables = jax.tree_util.tree_map(lambda a: a.astype(dtype), module.init(k3, x1))
    model = ntkcv.from_linen(module, variables)
    check_tiles(model, x1, x2, dtype, [()])
    cover = coverage_of(model, x1)
    assert [layer.key for layer in cover.layers] == ["linen/Conv_0", "linen/Conv_1", "linen/Conv_2",
                                                     "linen/DenseGeneral_0"]
    assert {path for path, _ in cover.fallback} == {"['Conv_3']['bias']", "['Conv_3']['kernel']"}


class TiedEmbedding(nn.Module):
    """Embed used for lookup and (through ``attend``) as the output projection."""

    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(7, 4)
        h = jnp.tanh(nn.Dense(4)(embed(tokens)))
        return embed.attend(h)


class NNXSequence(nnx.Module):
    def __init__(self, rngs, dtype):
        self.embed = nnx.Embed(9, 4, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.mix = nnx.LinearGeneral((3, 4), 5, axis=(-2, -1), param_dtype=dtype, rngs=rngs)
        self.shared = nnx.Linear(5, 5, param_dtype=dtype, rngs=rngs)
        self.out = nnx.Linear(5, 2, param_dtype=dtype, rngs=rngs)

    def __call__(self, tokens):
        h = jnp.tanh(self.mix(self.embed(tokens)))
        return self.out(jnp.tanh(self.shared(jnp.tanh(self.shared(h)))))


def test_tied_embedding_falls_back_and_stays_exact(dtype):
    module = TiedEmbedding()
    tokens1 = jax.random.randint(jax.random.key(0), (4, 3), 0, 7)
    tokens2 = jax.random.randint(jax.random.key(1), (2, 3), 0, 7)
    variables = jax.tree_util.tree_map(lambda a: a.astype(dtype), module.init(jax.random.key(2), tokens1))
    model = ntkcv.from_linen(module, variables)
    check_tiles(model, tokens1, tokens2, dtype, [(-1,), (1, 2)])
    cover = coverage_of(model, tokens1)
    assert [layer.key for layer in cover.layers] == ["linen/Dense_0"]
    assert [path for path, _ in cover.fallback] == ["['Embed_0']['embedding']"]


def test_nnx_embed_linear_general_and_shared_linear(dtype):
    model = ntkcv.from_nnx(NNXSequence(nnx.Rngs(0), dtype))
    tokens1 = jax.random.randint(jax.random.key(0), (4, 3), 0, 9)
    tokens2 = jax.random.randint(jax.random.key(1), (3, 3), 0, 9)
    check_tiles(model, tokens1, tokens2, dtype, [(-1,), ()])
    cover = coverage_of(model, tokens1)
    assert [layer.key for layer in cover.layers] == ["nnx/embed", "nnx/mix", "nnx/out"]
    assert all("shared" in path and "called 2 times" in why for path, why in cover.fallback)


@pytest.mark.parametrize("route", ["gram", "grad"])
def test_both_contraction_routes_are_exact(route, monkeypatch):
    """Force one route for every layer (the cost model picks per layer) on conv, sequence and embed layers, with one
    kept output and with several (the Gram route then carries the input Gram over to the cotangents)."""
    monkeypatch.setattr(structured, "_choose", lambda costs: route)
    with jax.enable_x64(True):
        for case, trace_axes in [("cnn", (-1,)), ("cnn", ()), ("sequence", ())]:
            model, x1, x2 = make_case(case, jnp.float64)
            check_tiles(model, x1, x2, jnp.float64, [trace_axes])


def test_plain_function_falls_back_entirely_and_logs_why(caplog):
    params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "v": jnp.linspace(0.5, 1.5, 8).reshape(4, 2)}
    model = ntkcv.from_function(lambda p, x: jnp.tanh(x @ p["w"]) @ p["v"], params)
    x1 = jax.random.normal(jax.random.key(0), (5, 3))
    x2 = jax.random.normal(jax.random.key(1), (2, 3))
    check_tiles(model, x1, x2, jnp.float32, [(-1,)])
    f = canonical_fn(model.apply_fn, output_layout(model.apply_fn, model.params, x1, (-1,)))
    with caplog.at_level(logging.DEBUG, logger="ntkcv.ntk"):
        cover = structured.coverage(f, model.params, x1)
    assert cover.layers == () and cover.covered_size == 0 and cover.fallback_size == 20
    assert "['v'] falls back to jacobian (not read by a supported layer; read by dot_general)" in caplog.text


def test_debug_log_names_each_leaf_path(caplog):
    model, x1, _ = make_case("layernorm")
    f = canonical_fn(model.apply_fn, output_layout(model.apply_fn, model.params, x1, (-1,)))
    with caplog.at_level(logging.DEBUG, logger="ntkcv.ntk"):
        jax.jit(lambda p, x: structured.kernel_tile(f, p, x, None))(model.params, x1)
    assert "['Dense_0']['kernel'] (dense linen/Dense_0" in caplog.text
    assert "['LayerNorm_0']['scale'] (elementwise, 6 parameters: its per-sample gradient)" in caplog.text
    assert "falls back" not in caplog.text


@pytest.mark.parametrize("diagonal", [False, True])
def test_ntk_fn_plans_once_and_matches_the_tile_functions(diagonal, monkeypatch):
    """``ntk_fn`` hands the coverage's plan to the kernel (one trace of the layers, not two), same numbers."""
    model, x1, _ = make_case("mlp_tanh")
    plans = []
    plan = structured._plan
    monkeypatch.setattr(structured, "_plan", lambda *args: plans.append(args) or plan(*args))
    kernel = ntkcv.ntk_fn(model.apply_fn, implementation="structured", diagonal=diagonal)(model.params, x1)
    assert len(plans) == 1
    same, _, diagonal_kernel = _tiles(model, (-1,), x1, x1)
    np.testing.assert_allclose(kernel, diagonal_kernel if diagonal else same, rtol=1e-6, atol=1e-6)


def test_cost_model_prefers_structured_for_the_reference_mlp():
    from ntkcv.ntk import jacobian
    from ntkcv.ntk.profile import ModelProfile

    module = nn.Sequential([nn.Dense(512), nn.tanh, nn.Dense(512), nn.tanh, nn.Dense(10)])
    x = jnp.zeros((8, 784))
    params = jax.eval_shape(module.init, jax.random.key(0), x)["params"]
    model = ntkcv.from_linen(module, {"params": params})
    f = canonical_fn(model.apply_fn, output_layout(model.apply_fn, params, x, (-1,)))
    cover = structured.coverage(f, params, x)
    assert cover.fallback == () and cover.covered_size == 784 * 512 + 512 * 512 + 5130 + 1024
    profile = ModelProfile(1, 10, cover.covered_size, 4, 2.0 * cover.covered_size, 40_000)
    assert structured.flops(profile, 256, 256, cover) < jacobian.flops(profile, 256, 256) / 10
    assert structured.tile_bytes(profile, 256, 256, cover) < jacobian.tile_bytes(profile, 256, 256) / 10


def test_ntk_fn_reuses_a_callers_abstract_evaluation_of_the_model():
    """The output layout is read outside the precision context, so a caller's own ``jax.eval_shape`` of the model
    (the monitor checks its probes with one) is reused: one trace of the model fewer."""
    model, x, _ = make_case("mlp_tanh")

    def model_traces(evaluated_first: bool) -> int:
        traces = []

        def apply_fn(p, x):
            traces.append(1)
            return model.apply_fn(p, x)

        if evaluated_first:
            jax.eval_shape(apply_fn, model.params, x)
            traces.clear()
        ntkcv.ntk_fn(apply_fn).trace(model.params, x)
        return len(traces)

    assert model_traces(True) == model_traces(False) - 1
