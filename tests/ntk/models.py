"""Small Flax models covering the layer types the NTK must handle, and a dense float64 reference."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import ntkcv


class MLP(nn.Module):
    activation: str = "tanh"

    @nn.compact
    def __call__(self, x):
        act = getattr(nn, self.activation)
        x = act(nn.Dense(7)(x))
        x = act(nn.Dense(5)(x))
        return nn.Dense(3)(x)


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), strides=(2, 2), padding=((1, 0), (2, 1)))(x))
        x = jnp.tanh(nn.Conv(3, (2, 2), padding="VALID", kernel_dilation=(2, 1))(x))
        return nn.Dense(2)(x.reshape(x.shape[0], -1))


class WithLayerNorm(nn.Module):
    # flax's default float32 reductions promote float64 inputs with float32, which strict dtype promotion refuses
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.LayerNorm(param_dtype=self.param_dtype, force_float32_reductions=False)(nn.Dense(6)(x))
        return nn.Dense(3)(jnp.tanh(x))


class Sequence(nn.Module):
    """Embed + DenseGeneral over a token sequence: outputs (N, T, 3)."""

    @nn.compact
    def __call__(self, tokens):
        h = nn.Embed(11, 6)(tokens)
        h = jnp.tanh(nn.DenseGeneral((2, 4))(h))
        return nn.DenseGeneral(3, axis=(-2, -1))(h)


class Shared(nn.Module):
    """One Dense applied twice (shared weights)."""

    @nn.compact
    def __call__(self, x):
        layer = nn.Dense(4)
        return nn.Dense(2)(layer(jnp.tanh(layer(x))))


class WithBatchNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.BatchNorm(use_running_average=True)(nn.Dense(6)(x))
        return nn.Dense(3)(nn.relu(x))


class NNXModel(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(1, 3, (3, 3), strides=2, rngs=rngs)
        self.norm = nnx.BatchNorm(3, use_running_average=True, rngs=rngs)
        self.out = nnx.Linear(4 * 4 * 3, 4, rngs=rngs)

    def __call__(self, x):
        h = jnp.tanh(self.norm(self.conv(x)))
        return self.out(h.reshape(h.shape[0], -1))


def _inputs(key, shape, dtype):
    return jax.random.normal(key, shape, dtype)


def make_case(name: str, dtype=jnp.float32):
    """``(model, x1, x2)`` for a named test model, parameters and inputs in ``dtype``."""
    k_init, k1, k2 = jax.random.split(jax.random.key(0), 3)
    cast = lambda tree: jax.tree_util.tree_map(  # noqa: E731
        lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)
    if name == "nnx":
        module = NNXModel(nnx.Rngs(0))
        bn_stats = module.norm
        bn_stats.mean[...] = jnp.linspace(-0.5, 0.5, 3, dtype=jnp.float32)
        bn_stats.var[...] = jnp.linspace(0.5, 2.0, 3, dtype=jnp.float32)
        graphdef, state = nnx.split(module)
        module = nnx.merge(graphdef, cast(state))
        x1, x2 = _inputs(k1, (5, 8, 8, 1), dtype), _inputs(k2, (3, 8, 8, 1), dtype)
        return ntkcv.from_nnx(module), x1, x2
    modules = {"mlp_tanh": (MLP("tanh"), (6,)), "mlp_relu": (MLP("relu"), (6,)), "cnn": (CNN(), (8, 8, 2)),
               "layernorm": (WithLayerNorm(param_dtype=dtype), (6,)), "shared": (Shared(), (4,)),
               "batchnorm": (WithBatchNorm(), (6,))}
    if name == "sequence":
        module = Sequence()
        x1 = jax.random.randint(k1, (5, 4), 0, 11)
        x2 = jax.random.randint(k2, (3, 4), 0, 11)
    else:
        module, features = modules[name]
        x1, x2 = _inputs(k1, (5, *features), dtype), _inputs(k2, (3, *features), dtype)
    with jax.numpy_dtype_promotion("standard"):  # flax's float32 parameters meet float64 inputs; cast after
        variables = cast(module.init(k_init, x1))
    if "batch_stats" in variables:  # non-trivial running statistics, held fixed
        variables = {**variables, "batch_stats": jax.tree_util.tree_map(
            lambda a: a + jnp.linspace(0.1, 0.9, a.size, dtype=dtype).reshape(a.shape), variables["batch_stats"])}
    return ntkcv.from_linen(module, variables), x1, x2


CASES = ["mlp_tanh", "mlp_relu", "cnn", "layernorm", "sequence", "shared", "batchnorm", "nnx"]


@functools.lru_cache(maxsize=64)
def _jitted_jacobian(apply_fn):
    """``jax.jacrev(apply_fn)`` jitted once per model: one compilation per input shape instead of one per primitive of
    an eager reverse pass."""
    return jax.jit(jax.jacrev(apply_fn))


def dense_jacobian(apply_fn, params, x, keep=None) -> np.ndarray:
    """``(N, *out, P)`` by ``jax.jacrev`` of the whole batch, in float64 numpy; ``keep(key_path)``: only the
    leaves it accepts (the Jacobian restricted to a group of parameters)."""
    jac = _jitted_jacobian(apply_fn)(params, x)
    out_ndim = jax.eval_shape(apply_fn, params, x).ndim
    leaves = [np.asarray(j, np.float64).reshape(j.shape[:out_ndim] + (-1,))
              for path, j in jax.tree_util.tree_leaves_with_path(jac) if keep is None or keep(path)]
    return np.concatenate(leaves, axis=-1)


def reference_kernel(apply_fn, params, x1, x2, trace_axes, keep=None) -> np.ndarray:
    """Θ from dense Jacobians: traced axes summed, kept axes in zipped order ``(N1, N2, k, k, …)``; ``keep``: as for
    :func:`dense_jacobian` (the kernel of those leaves only)."""
    j1, j2 = dense_jacobian(apply_fn, params, x1, keep), dense_jacobian(apply_fn, params, x2, keep)
    out_ndim = j1.ndim - 1
    traced = {a % out_ndim for a in trace_axes}
    letters = "cdefghijkl"
    sub1, sub2, kept = "a", "b", []
    for axis in range(1, out_ndim):
        if axis in traced:
            sub1 += letters[axis]
            sub2 += letters[axis]
        else:
            sub1 += letters[axis]
            sub2 += letters[axis].upper()
            kept.append(letters[axis] + letters[axis].upper())
    return np.einsum(f"{sub1}z,{sub2}z->ab{''.join(kept)}", j1, j2)


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def budget_for_tile(model, x, trace_axes, implementation, tile, groups=None) -> int:
    """The memory budget at which ``ntk_fn`` plans ``tile × tile`` tiles (with ``groups``: of the group kernels)."""
    from ntkcv.ntk.groups import partition
    from ntkcv.ntk.kernel import Implementation, _Costs
    from ntkcv.ntk.layout import canonical_fn, output_layout
    from ntkcv.ntk.profile import profile_model
    from ntkcv.ntk.validate import check_params

    layout = output_layout(model.apply_fn, model.params, x, trace_axes)
    f = canonical_fn(model.apply_fn, layout)
    profile = profile_model(f, model.params, x, layout.kept_size, layout.traced_size, check_params(model.params))
    leaf_groups = None if groups is None else partition(model.params, groups).leaf_groups
    return _Costs(f, model.params, x, profile, leaf_groups).tile_bytes[Implementation(implementation)](tile, tile)
