"""The kernel type of the collective variables, and private helpers they share: kernel shapes, eigenvalues and
runtime warnings."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

Kernel = Float[Array, "n n"] | Float[Array, "N N K K"]
"""A kernel as the collective variables take it: traced ``(N, N)``, full ``(N·K, N·K)`` (rows ordered ``(sample,
output)``, ``n = N·K``) or 4-D ``(N, N, K, K)``, which is read as ``(N·K, N·K)``."""


def as_matrix(kernel: jax.Array, name: str = "kernel", *, warn: bool = True) -> jax.Array:
    """Validate a kernel and return it as a square ``(n, n)`` matrix.

    A traced ``(N, N)`` or full ``(N·K, N·K)`` kernel is returned unchanged; a 4-D ``(N, N, K, K)`` kernel
    is reordered to ``(N, K, N, K)`` and reshaped to ``(N·K, N·K)`` (rows ordered ``(sample, output)``).
    With ``warn``, emits a ``RuntimeWarning`` (also under ``jit``, through a host callback) when the
    kernel has non-finite entries or is identically zero.
    """
    kernel = jnp.asarray(kernel)
    shape = kernel.shape
    if kernel.ndim == 4 and shape[0] == shape[1] and shape[2] == shape[3]:
        n, k = shape[0], shape[2]
        kernel = jnp.transpose(kernel, (0, 2, 1, 3)).reshape(n * k, n * k)
    elif kernel.ndim != 2 or shape[0] != shape[1]:
        raise ValueError(
            f"{name} must be a square matrix (n, n) or a 4-D kernel (N, N, K, K); got shape {shape}."
        )
    if kernel.shape[0] == 0:
        raise ValueError(f"{name} must have at least one row; got shape {shape}.")
    if not jnp.issubdtype(kernel.dtype, jnp.floating):
        kernel = kernel.astype(jnp.result_type(float))
    if warn:
        warn_if(~jnp.all(jnp.isfinite(kernel)), f"{name} has non-finite entries; its CVs are NaN.")
        warn_if(jnp.all(kernel == 0), f"{name} is identically zero; normalised CVs (entropy, ...) are NaN.")
    return kernel


def symmetric_eigvalsh(matrix: jax.Array) -> jax.Array:
    """Eigenvalues of ``(A + Aᵀ)/2`` in descending order."""
    return jnp.linalg.eigvalsh(symmetrise(matrix))[::-1]


def symmetric_eigh(matrix: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Eigenvalues (descending) and eigenvectors (matching columns) of ``(A + Aᵀ)/2``."""
    eigenvalues, eigenvectors = jnp.linalg.eigh(symmetrise(matrix))
    return eigenvalues[::-1], eigenvectors[:, ::-1]


def symmetrise(matrix: jax.Array) -> jax.Array:
    return 0.5 * (matrix + matrix.T)


def warn_if(condition: jax.Array, message: str) -> None:
    """Emit ``RuntimeWarning(message)`` when ``condition`` holds, eagerly or inside ``jit``/``vmap``."""

    def _callback(flag):
        if np.any(flag):
            warnings.warn(message, RuntimeWarning, stacklevel=2)

    jax.debug.callback(_callback, condition)
