"""Output layout: which output axes are traced (summed) and which are kept in the kernel.

``apply_fn(params, x)`` returns ``(N, *out)``. ``trace_axes`` index that whole array (as in
neural-tangents: axis 0 is the batch axis and cannot be traced; negative axes count from the end). The
kernel implementations see outputs reshaped to ``(N, O, R)`` (kept axes flattened into ``O``, traced
into ``R``) and return ``(N₁, N₂, O, O)``; :meth:`OutputLayout.unflatten_kernel` restores the kept axes
in neural-tangents' zipped order ``(N₁, N₂, k₁, k₁, k₂, k₂, …)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PyTree, Shaped

ApplyFn = Callable[[PyTree, Shaped[Array, "N ..."]], Float[Array, "N ..."]]
"""A model as the NTK sees it: ``apply_fn(params, x)`` maps ``N`` inputs to one array of outputs ``(N, *out)``."""


class OutputLayout(NamedTuple):
    """Static description of the model output ``(N, *out)`` split into kept and traced axes."""

    kept_axes: tuple[int, ...]  # axes of the full output, batch axis excluded
    traced_axes: tuple[int, ...]
    kept_shape: tuple[int, ...]
    traced_shape: tuple[int, ...]

    @property
    def kept_size(self) -> int:
        return math.prod(self.kept_shape)

    @property
    def traced_size(self) -> int:
        return math.prod(self.traced_shape)

    def canonical(self, out: jax.Array) -> jax.Array:
        """``(N, *out) -> (N, O, R)``."""
        out = jnp.transpose(out, (0, *self.kept_axes, *self.traced_axes))
        return out.reshape(out.shape[0], self.kept_size, self.traced_size)

    def unflatten_kernel(self, kernel: jax.Array) -> jax.Array:
        """``(N₁, N₂, O, O) -> (N₁, N₂, k₁, k₁, k₂, k₂, …)``."""
        return _zip_pairs(kernel.reshape(kernel.shape[:2] + self.kept_shape * 2), leading=2)

    def unflatten_diagonal(self, diagonal: jax.Array) -> jax.Array:
        """``(N, O, O) -> (N, k₁, k₁, k₂, k₂, …)``; a fully traced kernel gives ``(N,)``."""
        return _zip_pairs(diagonal.reshape(diagonal.shape[:1] + self.kept_shape * 2), leading=1)


def _zip_pairs(array: jax.Array, leading: int) -> jax.Array:
    m = (array.ndim - leading) // 2
    order = [*range(leading)] + [leading + i + j * m for i in range(m) for j in range(2)]
    return jnp.transpose(array, order)


def make_layout(output_shape: Sequence[int], trace_axes: Sequence[int]) -> OutputLayout:
    """Validate ``trace_axes`` against the model's output shape ``(N, *out)``."""
    ndim = len(output_shape)
    normalised = []
    for axis in trace_axes:
        if not isinstance(axis, int):
            raise TypeError(f"trace_axes must hold ints, got {axis!r}")
        if not -ndim <= axis < ndim:
            raise ValueError(
                f"trace_axes entry {axis} is out of range for model outputs of shape {tuple(output_shape)} "
                f"(valid: {-ndim + 1}..{ndim - 1}, batch axis 0 excluded)"
            )
        axis %= ndim
        if axis == 0:
            raise ValueError("trace_axes cannot contain the batch axis 0: the kernel is indexed by samples")
        normalised.append(axis)
    if len(set(normalised)) != len(normalised):
        raise ValueError(f"trace_axes has repeated axes: {tuple(trace_axes)}")
    traced = tuple(sorted(normalised))
    kept = tuple(a for a in range(1, ndim) if a not in traced)
    return OutputLayout(
        kept_axes=kept,
        traced_axes=traced,
        kept_shape=tuple(output_shape[a] for a in kept),
        traced_shape=tuple(output_shape[a] for a in traced),
    )


def canonical_fn(apply_fn: Callable, layout: OutputLayout) -> Callable[[Any, jax.Array], jax.Array]:
    """``f(params, x) -> (N, O, R)`` around ``apply_fn``."""

    def f(params, x):
        return layout.canonical(apply_fn(params, x))

    return f


def flatten_kernel(kernel: jax.Array) -> jax.Array:
    """A zipped kernel ``(N₁, N₂, k₁, k₁, …)`` as a matrix ``(N₁·K, N₂·K)``, rows ordered ``(sample, output)``.

    A traced ``(N₁, N₂)`` kernel is returned unchanged.
    """
    kernel = jnp.asarray(kernel)
    if kernel.ndim < 2 or kernel.ndim % 2:
        raise ValueError(f"kernel must have an even number of axes (N1, N2, k1, k1, ...), got shape {kernel.shape}")
    m = (kernel.ndim - 2) // 2
    order = [0, *(2 + 2 * i for i in range(m)), 1, *(3 + 2 * i for i in range(m))]
    kernel = jnp.transpose(kernel, order)
    size = math.prod(kernel.shape[1 : 1 + m])
    return kernel.reshape(kernel.shape[0] * size, -1)


def output_layout(apply_fn: Callable, params: Any, x: jax.Array, trace_axes: Sequence[int]) -> OutputLayout:
    """Evaluate ``apply_fn`` abstractly on ``x`` and check its output is one array ``(N, …)``."""
    out = jax.eval_shape(apply_fn, params, x)
    if not isinstance(out, jax.ShapeDtypeStruct):
        raise TypeError(
            f"apply_fn must return a single array of shape (N, ...), got {type(out).__name__}: "
            f"{jax.tree_util.tree_map(lambda leaf: leaf.shape, out)}"
        )
    if out.ndim == 0 or out.shape[0] != x.shape[0]:
        raise ValueError(
            f"apply_fn must return outputs with the batch axis first: inputs of shape {x.shape} "
            f"gave outputs of shape {out.shape}"
        )
    if not jnp.issubdtype(out.dtype, jnp.inexact):
        raise TypeError(f"apply_fn must return floating-point outputs, got dtype {out.dtype}")
    return make_layout(out.shape, trace_axes)
