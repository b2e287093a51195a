"""NTK-vector products: columns of Θ from Jacobian-vector products, no Jacobian contraction.

For every sample ``b`` of ``x₂`` and output ``(q, r)`` the per-sample gradient
``g_{bqr} = ∂f_{qr}(x_b)/∂θ`` (one vector-Jacobian product) is pushed forward through the model at
``x₁`` (one linearised forward pass):

.. math::
   Θ_{ab,oq} = \\sum_r [J(x_1)\\, g_{bqr}]_{a o r}

Cost: ``N₂·O·R`` single-sample backward passes plus ``N₂·O·R`` linearised forward passes over ``N₁``
samples; no ``N·N·P`` contraction. Fastest when a forward pass is cheap relative to ``O·P`` (wide dense
layers, full kernels); memory ``N₂·O·R·P`` numbers for the gradients. Gives only the whole Θ (one group):
splitting it into parameter groups would take one push-forward per group.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ntkcv.ntk.jacobian import CanonicalFn
from ntkcv.ntk.profile import ModelProfile


def _per_sample_gradients(f: CanonicalFn, params: Any, x: jax.Array) -> Any:
    """Pytree with leaves ``(N, O·R, *leaf)``: the gradient of every output of every sample."""

    def single(sample):
        out, vjp_fn = jax.vjp(lambda p: f(p, sample[None])[0], params)
        basis = jnp.eye(out.size, dtype=out.dtype).reshape((out.size,) + out.shape)
        return jax.vmap(vjp_fn)(basis)[0]

    return jax.vmap(single)(x)


def kernel_tile(f: CanonicalFn, params: Any, x1: jax.Array, x2: jax.Array | None) -> tuple[jax.Array]:
    """``(Θ(x₁, x₂),)``, shape ``(N₁, N₂, O, O)``, from NTK-vector products; ``x2=None`` means ``x2 = x1``."""
    grads = _per_sample_gradients(f, params, x1 if x2 is None else x2)
    _, push_forward = jax.linearize(lambda p: f(p, x1), params)
    columns = jax.vmap(jax.vmap(push_forward))(grads)  # (N2, O·R, N1, O, R)
    n2, _, n1, kept, traced = columns.shape
    columns = columns.reshape(n2, kept, traced, n1, kept, traced)
    return (jnp.einsum("bqraor->aboq", columns),)


def diagonal_tile(f: CanonicalFn, params: Any, x: jax.Array) -> tuple[jax.Array]:
    """``(Θ(x_a, x_a),)`` for each sample, shape ``(N, O, O)``."""

    def single(sample):
        grads = _per_sample_gradients(f, params, sample[None])
        _, push_forward = jax.linearize(lambda p: f(p, sample[None])[0], params)
        columns = jax.vmap(push_forward)(jax.tree_util.tree_map(lambda g: g[0], grads))  # (O·R, O, R)
        kept, traced = columns.shape[1:]
        return jnp.einsum("qror->oq", columns.reshape(kept, traced, kept, traced))

    return (jax.vmap(single)(x),)


def flops(profile: ModelProfile, n1: int, n2: int) -> float:
    """``N₂·O·R`` backward passes plus ``N₂·O·R`` linearised forward passes over ``N₁`` samples."""
    directions = n2 * profile.kept * profile.traced
    return directions * 3 * profile.forward_flops + directions * n1 * 2 * profile.forward_flops


def tile_bytes(profile: ModelProfile, b1: int, b2: int) -> int:
    """Per-sample gradients of ``x₂`` and the ``b₂·O·R`` batched forward passes over ``x₁``."""
    o, r, p, item = profile.kept, profile.traced, profile.num_params, profile.itemsize
    directions = b2 * o * r
    return directions * (p * item + b1 * (profile.activation_bytes + o * r * item))
