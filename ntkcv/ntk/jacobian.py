"""Jacobian contraction: Θ = Σ_leaves J₁ J₂ᵀ from per-sample Jacobians.

Every tile function in ``ntkcv.ntk`` receives ``f(params, x) -> (N, O, R)``: the model's outputs with
the kept (untraced) output axes flattened into ``O`` and the traced ones into ``R``. It returns the
kernel summed over ``R`` as a tuple with one kernel per parameter group (:mod:`ntkcv.ntk.groups`; by default
one group, the whole Θ):

.. math::
   Θ_{ab,oq} = \\sum_{r} \\sum_{p} ∂_p f_{o r}(x_a) \\; ∂_p f_{q r}(x_b)

Cost: ``(N₁ + N₂)·O·R`` backward passes of one sample, plus ``N₁·N₂·O²·R·P`` multiply-adds;
memory ``(N₁ + N₂)·O·R·P`` numbers for the Jacobians. Fastest when ``P`` is small relative to the cost
of a forward pass (convolutions with few channels); reliable for every differentiable model. When the Jacobians
of all samples exceed the memory budget, the leaves, in the order the model reads them, are cut into chunks
(:func:`ntkcv.ntk.tiling.plan_chunks`) whose Jacobians fit, Θ_g = Σ_chunks Σ_{leaves in chunk and g} J₁J₂ᵀ, a leaf
too large for one chunk cut into slices of its parameters (:func:`ntkcv.ntk.tiling.plan_parts`): each sample's
Jacobians are still built once per chunk, at the price of one more backward pass per sample and chunk (which stops
at the chunk's first layer), instead of once per tile of the kernel.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from ntkcv.ntk.groups import LeafGroups, group_sums
from ntkcv.ntk.profile import ModelProfile

CanonicalFn = Callable[[Any, jax.Array], jax.Array]  # (params, x (N, ...)) -> (N, O, R)


Part = tuple[int, int, int]  # (leaf number in tree_leaves order, start, stop): a slice of its flattened parameters


def per_sample_jacobian(f: CanonicalFn, params: Any, x: jax.Array,
                        parts: Sequence[Part] | None = None) -> list[jax.Array]:
    """Per-sample Jacobians with respect to ``parts`` of the leaves of ``params`` (``None``: all leaves whole):
    ``(N, O, R, *leaf)`` for a whole leaf, ``(N, O, R, stop - start)`` for a slice of its flattened parameters. The
    other parameters are held fixed, so the backward pass computes no cotangent for leaves without a part (a sliced
    leaf's whole gradient is formed, then sliced)."""
    flat, treedef = jax.tree_util.tree_flatten(params)
    chosen = [(i, 0, leaf.size) for i, leaf in enumerate(flat)] if parts is None else parts

    def whole(part):
        i, start, stop = part
        return (start, stop) == (0, flat[i].size)

    def single(values, sample):
        full = list(flat)
        for part, value in zip(chosen, values, strict=True):
            i, start, _ = part
            full[i] = value if whole(part) else jax.lax.dynamic_update_slice(
                full[i].ravel(), value, (start,)).reshape(full[i].shape)
        return f(jax.tree_util.tree_unflatten(treedef, full), sample[None])[0]

    values = [flat[i] if whole((i, start, stop)) else flat[i].ravel()[start:stop] for i, start, stop in chosen]
    return jax.vmap(lambda sample: jax.jacrev(single)(values, sample))(x)


def contract_leaf(j1: jax.Array, j2: jax.Array) -> jax.Array:
    """One leaf's ``J₁ J₂ᵀ`` summed over the traced axis and parameters: ``(N₁, O, R, …), (N₂, O, R, …) -> (N₁, N₂,
    O, O)``, one ``(N₁O × RP) · (RP × N₂O)`` product of the Jacobians as stored (XLA lowers a contraction over the
    traced and parameter axes as two axes with a transposed copy of each Jacobian first)."""
    (n1, o), n2 = j1.shape[:2], j2.shape[0]
    k = jax.lax.dot_general(j1.reshape(n1 * o, -1), j2.reshape(n2 * o, -1), (((1,), (1,)), ((), ())))
    return k.reshape(n1, o, n2, o).transpose(0, 2, 1, 3)


def contract_leaf_diagonal(j: jax.Array) -> jax.Array:
    """One leaf's per-sample blocks ``Θ_aa``: ``(N, O, R, …) -> (N, O, O)``."""
    j = j.reshape(j.shape[:2] + (-1,))
    return jnp.einsum("aok,aqk->aoq", j, j)


def split_fn(f: CanonicalFn, params: Any, *, groups: LeafGroups | None = None, parts: Sequence[Part] | None = None):
    """``(features_fn, contract_fn)`` for :func:`ntkcv.ntk.tiling.tiled_split_kernel`: ``features_fn(x_tile)`` builds
    the tile's per-sample Jacobians with respect to ``parts`` of the leaves (as for :func:`per_sample_jacobian`;
    ``None``: all leaves whole), ``contract_fn(J₁, J₂)`` pairs them up into one ``(b₁, b₂, O, O)`` kernel per group
    (``groups``: each leaf's group; ``None``: one group), a group with none of these parts getting zeros. Summed over
    chunks of parts that cover every leaf once, these kernels are Θ_g."""
    leaves = jax.tree_util.tree_leaves(params)
    chosen = tuple((i, 0, leaf.size) for i, leaf in enumerate(leaves)) if parts is None else tuple(parts)

    def features_fn(x_tile):
        return per_sample_jacobian(f, params, x_tile, chosen)

    def contract_fn(jac1, jac2):
        return group_sums(zip((i for i, *_ in chosen), map(contract_leaf, jac1, jac2), strict=True), groups)

    return features_fn, contract_fn


def kernel_tile(f: CanonicalFn, params: Any, x1: jax.Array, x2: jax.Array | None, *,
                groups: LeafGroups | None = None) -> tuple[jax.Array, ...]:
    """Θ_g(x₁, x₂) of shape ``(N₁, N₂, O, O)`` for each group by Jacobian contraction (``groups``: each leaf's
    group; ``None``: one group, the whole Θ); ``x2=None`` means ``x2 = x1``."""
    features_fn, contract_fn = split_fn(f, params, groups=groups)
    jac1 = features_fn(x1)
    return contract_fn(jac1, jac1 if x2 is None else features_fn(x2))


def diagonal_tile(f: CanonicalFn, params: Any, x: jax.Array, *,
                  groups: LeafGroups | None = None) -> tuple[jax.Array, ...]:
    """Θ_g(x_a, x_a) for each sample and group, shape ``(N, O, O)``."""
    return group_sums(enumerate(map(contract_leaf_diagonal, per_sample_jacobian(f, params, x))), groups)


def flops(profile: ModelProfile, n1: int, n2: int) -> float:
    """``(N₁+N₂)·O·R`` backward passes (≈ 3 forward passes each) plus the ``N₁N₂O²RP`` contraction."""
    o, r, p = profile.kept, profile.traced, profile.num_params
    return (n1 + n2) * o * r * 3 * profile.forward_flops + 2.0 * n1 * n2 * o * o * r * p


def tile_bytes(profile: ModelProfile, b1: int, b2: int) -> int:
    """Jacobians of both tiles, their backward passes' activations and the kernel block."""
    o, r, p, item = profile.kept, profile.traced, profile.num_params, profile.itemsize
    return (b1 + b2) * o * r * (p * item + profile.activation_bytes) + 2 * b1 * b2 * o * o * item


def split_bytes(profile: ModelProfile, n1: int, n2: int, *, num_params: int | None = None, sliced_params: int = 0):
    """Memory of :func:`split_fn`'s path for parts of ``num_params`` parameters (``None``: all), of which some are
    slices of leaves of ``sliced_params`` parameters in all (their whole gradients are formed before they are
    sliced): ``(bytes of one sample's stored Jacobians, build_bytes(b), contract_bytes(b₁, b₂))``, the last two the
    peaks of building ``b`` samples' Jacobians (the tile's Jacobians before they are stored, the sliced leaves' whole
    gradients, its backward passes' activations) and of contracting a ``b₁ × b₂`` tile (its kernel block and the
    result's; a tile smaller than ``n₁ × n₂`` also copies its samples' Jacobians out of the store)."""
    o, r, item = profile.kept, profile.traced, profile.itemsize
    stored = o * r * (profile.num_params if num_params is None else num_params) * item

    def build_bytes(b: int, _: int = 0) -> int:
        return b * (stored + o * r * (sliced_params * item + profile.activation_bytes))

    def contract_bytes(b1: int, b2: int) -> int:
        return 2 * b1 * b2 * o * o * item + (0 if (b1, b2) == (n1, n2) else (b1 + b2) * stored)

    return stored, build_bytes, contract_bytes
