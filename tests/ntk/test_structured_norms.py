"""Parameters read elementwise (norm scales and biases in linen, NNX and equinox, position embeddings, class tokens,
layer scales) and attention projections in the structured kernel: exact against dense ``jacrev``, none falls back, on
the reference ResNet-18 and ViT neither, and ``auto`` picks ``structured`` for them."""

import logging
import re

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.nnx.nn.attention import dot_product_attention_weights

import ntkcv
from benchmarks.reference_models import ResNet18, ViT
from ntkcv.ntk import jacobian, structured
from ntkcv.ntk.layout import canonical_fn, output_layout
from ntkcv.ntk.profile import ModelProfile
from tests.ntk.models import reference_kernel, relative_error
from tests.ntk.test_structured import check_tiles, coverage_of


def _perturbed(tree, seed):
    """Every leaf moved off its initial value (unit scales and zero biases would hide mistakes)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda a: a + 0.3 * rng.standard_normal(a.shape).astype(a.dtype), tree)


class LinenTokens(nn.Module):
    """Tokens ``(N, 4, 3) -> (N, 5, 2)``: a class token, a position embedding, every linen norm (with and without
    scale or bias, groups, two feature axes, BatchNorm in eval mode) and a layer scale."""

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        p = {"param_dtype": self.dtype, "force_float32_reductions": self.dtype == jnp.float32}
        h = nn.Dense(6, param_dtype=self.dtype)(x)
        cls = self.param("cls_token", nn.initializers.normal(), (1, 1, 6), self.dtype)
        h = jnp.concatenate([jnp.broadcast_to(cls, (h.shape[0], 1, 6)), h], axis=1)
        h = h + self.param("pos_embedding", nn.initializers.normal(), (1, 5, 6), self.dtype)
        h = jnp.tanh(nn.LayerNorm(**p)(h))
        h = jnp.tanh(nn.LayerNorm(use_bias=False, **p)(h))
        h = jnp.tanh(nn.LayerNorm(use_scale=False, reduction_axes=(-2, -1), feature_axes=(-2, -1), **p)(h))
        h = jnp.tanh(nn.GroupNorm(num_groups=3, **p)(h))
        h = jnp.tanh(nn.RMSNorm(**p)(h))
        h = nn.BatchNorm(use_running_average=True, axis=(-2, -1), **p)(h)
        h = h * self.param("layer_scale", nn.initializers.ones, (6,), self.dtype)[None, None]
        return nn.Dense(2, param_dtype=self.dtype)(jnp.tanh(h))


LINEN_ELEMENTWISE = {"['cls_token']", "['pos_embedding']", "['layer_scale']", "['LayerNorm_0']['scale']",
                     "['LayerNorm_0']['bias']", "['LayerNorm_1']['scale']", "['LayerNorm_2']['bias']",
                     "['GroupNorm_0']['scale']", "['GroupNorm_0']['bias']", "['RMSNorm_0']['scale']",
                     "['BatchNorm_0']['scale']", "['BatchNorm_0']['bias']"}


def _linen_case(dtype):
    module = LinenTokens(dtype)
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x1, x2 = jax.random.normal(k1, (4, 4, 3), dtype), jax.random.normal(k2, (3, 4, 3), dtype)
    variables = jax.jit(module.init)(k3, x1)
    variables = {"params": _perturbed(variables["params"], 0),
                 "batch_stats": {"BatchNorm_0": {"mean": jnp.linspace(-0.5, 0.5, 30, dtype=dtype).reshape(5, 6),
                                                 "var": jnp.linspace(0.5, 2.0, 30, dtype=dtype).reshape(5, 6)}}}
    return ntkcv.from_linen(module, variables), x1, x2


def test_linen_norms_position_embedding_and_class_token_are_exact_and_elementwise(caplog):
    with jax.enable_x64(True):
        model, x1, x2 = _linen_case(jnp.float64)
        check_tiles(model, x1, x2, jnp.float64, [()])  # x₂ = x₁ and not, the diagonal (traced: the groups' test)
        with caplog.at_level(logging.DEBUG, logger="ntkcv.ntk"):
            cover = coverage_of(model, x1)
    assert cover.fallback == () and cover.fallback_size == 0 and "falls back" not in caplog.text
    assert set(cover.elementwise) == LINEN_ELEMENTWISE
    assert [layer.kind for layer in cover.layers] == ["dense", "dense"]
    assert "['pos_embedding'] (elementwise, 30 parameters: its per-sample gradient)" in caplog.text


def test_linen_norm_groups_match_per_layer_references():
    with jax.enable_x64(True):
        model, x1, x2 = _linen_case(jnp.float64)
        kernels = ntkcv.ntk_fn(model.apply_fn, implementation="structured", groups="layers")(model.params, x1, x2)
        jac = jax.jit(jax.jacrev(model.apply_fn))(model.params, jnp.concatenate([x1, x2]))  # leaves (N, 5, 2, …)
    expected = {}
    for path, j in jax.tree_util.tree_leaves_with_path(jac):
        j = np.asarray(j).reshape(j.shape[:3] + (-1,))
        share = np.einsum("atoz,bsoz->abts", j[: x1.shape[0]], j[x1.shape[0]:])  # the last output axis traced
        expected[path[0].key] = expected.get(path[0].key, 0) + share
    assert set(kernels) == set(expected)
    for name, kernel in kernels.items():
        assert relative_error(kernel, expected[name]) <= 1e-10, name


def _attention(query, key, value, **_):
    """NNX's attention in the inputs' dtype (its default, ``jax.nn.dot_product_attention``, takes the softmax in
    float32)."""
    return jnp.einsum("...hqk,...khd->...qhd", dot_product_attention_weights(query, key), value)


class NNXTokens(nnx.Module):
    """Tokens ``(N, 4, 3) -> (N, 4, 2)``: self-attention (``LinearGeneral`` projections) and every NNX norm."""

    def __init__(self, rngs: nnx.Rngs, dtype):
        p = {"param_dtype": dtype, "rngs": rngs}
        self.embed = nnx.Linear(3, 6, **p)
        self.attention = nnx.MultiHeadAttention(num_heads=2, in_features=6, qkv_features=4, decode=False,
                                                attention_fn=_attention, **p)
        self.layer_norm = nnx.LayerNorm(6, use_bias=False, **p)
        self.group_norm = nnx.GroupNorm(6, num_groups=2, **p)
        self.rms_norm = nnx.RMSNorm(6, **p)
        self.batch_norm = nnx.BatchNorm(6, use_running_average=True, **p)
        self.out = nnx.Linear(6, 2, **p)

    def __call__(self, x):
        h = self.embed(x)
        h = h + self.attention(self.layer_norm(h))
        h = jnp.tanh(self.rms_norm(jnp.tanh(self.group_norm(h))))
        return self.out(jnp.tanh(self.batch_norm(h)))


class EquinoxNorms(eqx.Module):
    """One sample ``(3,) -> (2,)`` through equinox's LayerNorm, GroupNorm and RMSNorm."""

    embed: eqx.nn.Linear
    layer_norm: eqx.nn.LayerNorm
    group_norm: eqx.nn.GroupNorm
    rms_norm: eqx.nn.RMSNorm
    out: eqx.nn.Linear

    def __init__(self, key, dtype):
        k1, k2 = jax.random.split(key)
        self.embed = eqx.nn.Linear(3, 6, key=k1, dtype=dtype)
        self.layer_norm = eqx.nn.LayerNorm(6, dtype=dtype)
        self.group_norm = eqx.nn.GroupNorm(2, 6, dtype=dtype)
        self.rms_norm = eqx.nn.RMSNorm(6, dtype=dtype)
        self.out = eqx.nn.Linear(6, 2, key=k2, dtype=dtype)

    def __call__(self, x):
        h = jnp.tanh(self.layer_norm(self.embed(x)))
        return self.out(jnp.tanh(self.rms_norm(jnp.tanh(self.group_norm(h)))))


def _nnx_model(dtype):
    graphdef, state = nnx.split(NNXTokens(nnx.Rngs(0), dtype))  # the running statistics in the model's dtype too
    module = nnx.merge(graphdef, jax.tree_util.tree_map(lambda a: a.astype(dtype), state))
    module.batch_norm.mean[...] = jnp.linspace(-0.5, 0.5, 6, dtype=dtype)
    module.batch_norm.var[...] = jnp.linspace(0.5, 2.0, 6, dtype=dtype)
    model = ntkcv.from_nnx(module)
    return model._replace(params=_perturbed(model.params, 1))


def _equinox_model(dtype):
    model = ntkcv.from_equinox(EquinoxNorms(jax.random.key(0), dtype))
    return model._replace(params=_perturbed(model.params, 1))


# NNX's norms promote their statistics with float32, which strict promotion refuses for float64 inputs
@pytest.mark.parametrize("framework", [pytest.param("nnx", marks=pytest.mark.standard_dtype_promotion), "equinox"])
def test_nnx_and_equinox_norms_are_exact_and_elementwise(framework):
    k1, k2 = jax.random.split(jax.random.key(2))
    with jax.enable_x64(True):
        if framework == "nnx":
            model, shape = _nnx_model(jnp.float64), (4, 3)
            norms, layers = {"layer_norm", "group_norm", "rms_norm", "batch_norm"}, ["embed", "query", "key", "value",
                                                                                     "out", "out"]
        else:
            model, shape = _equinox_model(jnp.float64), (3,)
            norms, layers = {"layer_norm", "group_norm", "rms_norm"}, ["embed", "out"]
        x1, x2 = jax.random.normal(k1, (4, *shape), jnp.float64), jax.random.normal(k2, (3, *shape), jnp.float64)
        check_tiles(model, x1, x2, jnp.float64, [(-1,)])
        cover = coverage_of(model, x1)
    assert cover.fallback == ()
    assert [layer.key.rsplit("/", 1)[-1] for layer in cover.layers] == layers
    assert {re.match(r"\W*(\w+)", path).group(1) for path in cover.elementwise} == norms


def test_how_a_parameter_is_read_decides_elementwise_or_fallback():
    """Broadcast, cast, sliced, concatenated, inside an inner ``jit``: elementwise; multiplied as a matrix, gathered,
    normalised by a reduction or carried through ``lax.scan``: falls back, naming the primitive."""
    keys = iter(jax.random.split(jax.random.key(3), 12))
    with jax.enable_x64(True):
        shapes = {"matrix": (3, 3), "scale": (3,), "cast": (3,), "token": (1, 3), "inner": (3,), "table": (5, 3),
                  "normalised": (3,), "scanned": (3,), "sliced": (4,)}
        params = {name: jax.random.normal(next(keys), shape, jnp.float64) for name, shape in shapes.items()}

        def apply_fn(p, x):  # x: (N, 2, 3)
            cast = p["cast"].astype(jnp.float32).astype(x.dtype)
            h = jnp.tanh(x @ p["matrix"]) * p["scale"][None, None] + cast[None, None]
            h = jnp.concatenate([jnp.broadcast_to(p["token"][None], (x.shape[0], 1, 3)), h], axis=1)
            h = jax.jit(lambda h, s: jnp.tanh(h * s[None, None]))(h, p["inner"] + p["sliced"][1:])
            normalised = p["normalised"] / jnp.linalg.norm(p["normalised"])
            h = h + p["table"][jnp.array([0, 2, 4])][None] + normalised[None, None]
            h = h + jax.lax.scan(lambda c, _: (c * 0.5, None), p["scanned"], None, length=2)[0][None, None]
            return h.sum(1)

        model = ntkcv.from_function(apply_fn, params)
        x1, x2 = jax.random.normal(next(keys), (3, 2, 3), jnp.float64), jax.random.normal(next(keys), (2, 2, 3),
                                                                                         jnp.float64)
        cover = coverage_of(model, x1)
        kernel = ntkcv.ntk_fn(apply_fn, implementation="structured")(params, x1, x2)
        assert relative_error(kernel, reference_kernel(jax.jit(apply_fn), params, x1, x2, (-1,))) <= 1e-10
    assert set(cover.elementwise) == {"['scale']", "['cast']", "['token']", "['inner']", "['sliced']"}
    assert dict(cover.fallback) == {
        f"['{name}']": f"not read by a supported layer; read by {primitive}"
        for name, primitive in [("matrix", "dot_general"), ("table", "gather"), ("normalised", "reduce_sum"),
                                ("scanned", "scan")]}
    assert cover.gradient_size == sum(np.prod(shape) for shape in shapes.values())


def _linen_model(module, x):
    """``module`` with constant variables of the right shapes (no initialisation to compile: coverage and cost only)."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), x[:1])
    return ntkcv.from_linen(module, jax.tree_util.tree_map(lambda s: jnp.full(s.shape, 0.5, s.dtype), shapes))


def _reference_models():
    """The benchmarks' ResNet-18 and ViT classes, small (the same layer types), on CIFAR-shaped inputs."""
    x = jnp.zeros((2, 32, 32, 3))
    for module in (ResNet18(widths=(4, 8), classes=3), ViT(patch=8, dim=8, depth=2, heads=2, mlp=16, classes=3)):
        yield _linen_model(module, x), x


def test_the_reference_resnet_and_vit_take_no_fallback(caplog):
    for model, x in _reference_models():
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="ntkcv.ntk"):
            cover = coverage_of(model, x)
        assert cover.fallback == () and cover.elementwise, type(model)
        assert "structured:" in caplog.text and "falls back" not in caplog.text
    assert {"['cls_token']", "['pos_embedding']"} <= set(cover.elementwise)
    assert sum("MultiHeadDotProductAttention" in layer.key for layer in cover.layers) == 2 * 4  # q, k, v, out


def test_structured_never_costs_more_than_the_jacobian_and_ties_exactly(monkeypatch):
    """``"grad"`` forms the weight gradients the Jacobian's backward passes would: with every layer forced onto it the
    estimates are equal; with the cheaper route per layer, structured's is lower (the ViT's head takes "gram")."""
    for model, x in _reference_models():
        f = canonical_fn(model.apply_fn, output_layout(model.apply_fn, model.params, x, (-1,)))
        cover = structured.coverage(f, model.params, x)
        size = cover.covered_size + cover.fallback_size
        profile = ModelProfile(1, 10, size, 4, 1e7, 10**6)
        jacobian_flops = jacobian.flops(profile, 64, 64)
        assert structured.flops(profile, 64, 64, cover) < jacobian_flops
        with monkeypatch.context() as patched:
            patched.setattr(structured, "_choose", lambda costs: "grad")
            assert structured.flops(profile, 64, 64, cover) == jacobian_flops


@pytest.mark.parametrize("name", ["resnet", "vit"])
def test_auto_picks_structured_for_the_issue_resnet_and_vit(name, caplog):
    """The 6-block ResNet (BatchNorm) and 4-block ViT of the issue at N = 32, where ``structured`` is measured faster:
    ``auto`` reads it off the cost model at trace time."""
    module = ResNet18(widths=(16, 32, 64)) if name == "resnet" else ViT(dim=64, depth=4, heads=4, mlp=256)
    x = jnp.zeros((32, 32, 32, 3))
    model = _linen_model(module, x)
    with caplog.at_level(logging.DEBUG, logger="ntkcv.ntk"):
        ntkcv.ntk_fn(model.apply_fn).trace(model.params, x)
    assert "auto implementation: structured" in caplog.text
