"""Jacobian contraction: Θ = Σ_leaves J₁ J₂ᵀ from per-sample Jacobians.

Every tile function in ``ntkcv.ntk`` receives ``f(params, x) -> (N, O, R)``: the model's outputs with
the kept (untraced) output axes flattened into ``O`` and the traced ones into ``R``. It returns the
kernel summed over ``R``:

.. math::
   Θ_{ab,oq} = \\sum_{r} \\sum_{p} ∂_p f_{o r}(x_a) \\; ∂_p f_{q r}(x_b)

Cost: ``(N₁ + N₂)·O·R`` backward passes of one sample, plus ``N₁·N₂·O²·R·P`` multiply-adds;
memory ``(N₁ + N₂)·O·R·P`` numbers for the Jacobians. Fastest when ``P`` is small relative to the cost
of a forward pass (convolutions with few channels); reliable for every differentiable model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from ntkcv.ntk.profile import ModelProfile

CanonicalFn = Callable[[Any, jax.Array], jax.Array]  # (params, x (N, ...)) -> (N, O, R)


def per_sample_jacobian(f: CanonicalFn, params: Any, x: jax.Array) -> Any:
    """Per-sample Jacobians: a pytree like ``params`` whose leaves have shape ``(N, O, R, *leaf)``."""

    def single(sample):
        return jax.jacrev(lambda p: f(p, sample[None])[0])(params)

    return jax.vmap(single)(x)


def contract_jacobians(jac1: Any, jac2: Any) -> jax.Array:
    """Σ over leaves, traced axis and parameters of ``J₁ J₂ᵀ``: ``(N₁, O, R, …), (N₂, O, R, …) -> (N₁, N₂, O, O)``."""

    def leaf(j1, j2):
        j1 = j1.reshape(j1.shape[:3] + (-1,))
        j2 = j2.reshape(j2.shape[:3] + (-1,))
        return jnp.einsum("aorp,bqrp->aboq", j1, j2)

    return sum(jax.tree_util.tree_leaves(jax.tree_util.tree_map(leaf, jac1, jac2)))


def contract_diagonal(jac: Any) -> jax.Array:
    """Per-sample blocks ``Θ_aa``: ``(N, O, R, …) -> (N, O, O)``."""

    def leaf(j):
        j = j.reshape(j.shape[:3] + (-1,))
        return jnp.einsum("aorp,aqrp->aoq", j, j)

    return sum(jax.tree_util.tree_leaves(jax.tree_util.tree_map(leaf, jac)))


def kernel_tile(f: CanonicalFn, params: Any, x1: jax.Array, x2: jax.Array | None) -> jax.Array:
    """Θ(x₁, x₂) of shape ``(N₁, N₂, O, O)`` by Jacobian contraction; ``x2=None`` means ``x2 = x1``."""
    jac1 = per_sample_jacobian(f, params, x1)
    jac2 = jac1 if x2 is None else per_sample_jacobian(f, params, x2)
    return contract_jacobians(jac1, jac2)


def diagonal_tile(f: CanonicalFn, params: Any, x: jax.Array) -> jax.Array:
    """Θ(x_a, x_a) for each sample, shape ``(N, O, O)``."""
    return contract_diagonal(per_sample_jacobian(f, params, x))


def flops(profile: ModelProfile, n1: int, n2: int) -> float:
    """``(N₁+N₂)·O·R`` backward passes (≈ 3 forward passes each) plus the ``N₁N₂O²RP`` contraction."""
    o, r, p = profile.kept, profile.traced, profile.num_params
    return (n1 + n2) * o * r * 3 * profile.forward_flops + 2.0 * n1 * n2 * o * o * r * p


def tile_bytes(profile: ModelProfile, b1: int, b2: int) -> int:
    """Jacobians of both tiles, their backward passes' activations and the kernel block."""
    o, r, p, item = profile.kept, profile.traced, profile.num_params, profile.itemsize
    return (b1 + b2) * o * r * (p * item + profile.activation_bytes) + 2 * b1 * b2 * o * o * item
