r"""Class-wise collective variables: the CVs of each class's diagonal block of the kernel.

For integer labels :math:`y \in \{0, …, C-1\}^N` the block of class ``c`` is :math:`Θ_{cc} =
[Θ_{ij}]_{y_i = y_j = c}`; for a full ``(N·K, N·K)`` kernel it spans the samples of class ``c`` and all
``K`` outputs. To stay ``jit``-able with static shapes the block is never sliced out: rows and columns
outside the class are zeroed instead, which adds only zero eigenvalues (and :math:`0 \ln 0 = 0`).
Cost: one ``n × n`` eigendecomposition per class for the entropy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from ntkcv.cv._kernel import Kernel, as_matrix, symmetric_eigvalsh
from ntkcv.cv.spectral import entropy_of

__all__ = ["classwise_entropy", "classwise_trace"]


def classwise_entropy(kernel: Kernel, labels: Int[Array, " N"], *, num_classes: int) -> Float[Array, " num_classes"]:
    r"""Von Neumann entropy :math:`S(Θ_{cc})` of each class block, shape ``(num_classes,)``.

    Conventions as in :func:`ntkcv.cv.entropy`; a class absent from ``labels`` gives NaN.
    """
    matrix = as_matrix(kernel)
    return classwise_entropy_of(matrix, class_masks(labels, num_classes, matrix.shape[0]))


def classwise_trace(kernel: Kernel, labels: Int[Array, " N"], *, num_classes: int) -> Float[Array, " num_classes"]:
    r"""Trace :math:`\operatorname{tr} Θ_{cc}` of each class block, shape ``(num_classes,)``; 0 if absent."""
    matrix = as_matrix(kernel)
    return classwise_trace_of(matrix, class_masks(labels, num_classes, matrix.shape[0]))


def class_masks(labels: jax.Array, num_classes: int, n: int) -> jax.Array:
    """Boolean ``(num_classes, n)`` row masks of each class, labels repeated over the ``n / N`` outputs."""
    labels = jnp.asarray(labels)
    if labels.ndim != 1 or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be 1-D integers (N,); got {labels.dtype} of shape {labels.shape}.")
    if labels.shape[0] == 0 or n % labels.shape[0]:
        raise ValueError(f"labels must have N entries, n = {n} a multiple of N; got shape {labels.shape}.")
    if num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer; got {num_classes}.")
    rows = jnp.repeat(labels, n // labels.shape[0])
    return rows[None, :] == jnp.arange(num_classes, dtype=labels.dtype)[:, None]


def classwise_trace_of(matrix: jax.Array, masks: jax.Array) -> jax.Array:
    return masks.astype(matrix.dtype) @ jnp.diagonal(matrix)


def classwise_entropy_of(matrix: jax.Array, masks: jax.Array) -> jax.Array:
    def block_entropy(mask):
        return entropy_of(symmetric_eigvalsh(jnp.where(mask[:, None] & mask[None, :], matrix, 0.0)))

    return jax.lax.map(block_entropy, masks)
