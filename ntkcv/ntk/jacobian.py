"""Jacobian contraction: Θ = Σ_leaves J₁ J₂ᵀ from per-sample Jacobians.

Every tile function in ``ntkcv.ntk`` receives ``f(params, x) -> (N, O, R)``: the model's outputs with
the kept (untraced) output axes flattened into ``O`` and the traced ones into ``R``. It returns the
kernel summed over ``R`` as a tuple with one kernel per parameter group (:mod:`ntkcv.ntk.groups`; by default
one group, the whole Θ):

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

from ntkcv.ntk.groups import LeafGroups, group_sums
from ntkcv.ntk.profile import ModelProfile

CanonicalFn = Callable[[Any, jax.Array], jax.Array]  # (params, x (N, ...)) -> (N, O, R)


def per_sample_jacobian(f: CanonicalFn, params: Any, x: jax.Array) -> Any:
    """Per-sample Jacobians: a pytree like ``params`` whose leaves have shape ``(N, O, R, *leaf)``."""

    def single(sample):
        return jax.jacrev(lambda p: f(p, sample[None])[0])(params)

    return jax.vmap(single)(x)


def contract_leaf(j1: jax.Array, j2: jax.Array) -> jax.Array:
    """One leaf's ``J₁ J₂ᵀ`` summed over the traced axis and parameters: ``(N₁, O, R, …), (N₂, O, R, …) -> (N₁, N₂,
    O, O)``."""
    return jnp.einsum("aorp,bqrp->aboq", j1.reshape(j1.shape[:3] + (-1,)), j2.reshape(j2.shape[:3] + (-1,)))


def contract_leaf_diagonal(j: jax.Array) -> jax.Array:
    """One leaf's per-sample blocks ``Θ_aa``: ``(N, O, R, …) -> (N, O, O)``."""
    j = j.reshape(j.shape[:3] + (-1,))
    return jnp.einsum("aorp,aqrp->aoq", j, j)


def kernel_tile(f: CanonicalFn, params: Any, x1: jax.Array, x2: jax.Array | None, *,
                groups: LeafGroups | None = None) -> tuple[jax.Array, ...]:
    """Θ_g(x₁, x₂) of shape ``(N₁, N₂, O, O)`` for each group by Jacobian contraction (``groups``: each leaf's
    group; ``None``: one group, the whole Θ); ``x2=None`` means ``x2 = x1``."""
    jac1 = jax.tree_util.tree_leaves(per_sample_jacobian(f, params, x1))
    jac2 = jac1 if x2 is None else jax.tree_util.tree_leaves(per_sample_jacobian(f, params, x2))
    return group_sums(enumerate(map(contract_leaf, jac1, jac2)), groups)


def diagonal_tile(f: CanonicalFn, params: Any, x: jax.Array, *,
                  groups: LeafGroups | None = None) -> tuple[jax.Array, ...]:
    """Θ_g(x_a, x_a) for each sample and group, shape ``(N, O, O)``."""
    jac = jax.tree_util.tree_leaves(per_sample_jacobian(f, params, x))
    return group_sums(enumerate(map(contract_leaf_diagonal, jac)), groups)


def flops(profile: ModelProfile, n1: int, n2: int) -> float:
    """``(N₁+N₂)·O·R`` backward passes (≈ 3 forward passes each) plus the ``N₁N₂O²RP`` contraction."""
    o, r, p = profile.kept, profile.traced, profile.num_params
    return (n1 + n2) * o * r * 3 * profile.forward_flops + 2.0 * n1 * n2 * o * o * r * p


def tile_bytes(profile: ModelProfile, b1: int, b2: int) -> int:
    """Jacobians of both tiles, their backward passes' activations and the kernel block."""
    o, r, p, item = profile.kept, profile.traced, profile.num_params, profile.itemsize
    return (b1 + b2) * o * r * (p * item + profile.activation_bytes) + 2 * b1 * b2 * o * o * item
