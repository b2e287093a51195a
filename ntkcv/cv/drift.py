r"""Drift of the NTK during training: how far a kernel Θ has moved from a reference :math:`Θ_0`.

Both kernels must be evaluated on the same probe set (same shape); they are validated and flattened as
in :mod:`ntkcv.cv.spectral`. In the lazy (kernel) regime all three drifts stay near zero (Jacot et al.
2018); feature learning shows up as drift (Fort et al., "Deep learning versus kernel learning", 2020).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from ntkcv.cv._kernel import Kernel, as_matrix, symmetric_eigh

__all__ = ["cosine_distance", "kernel_velocity", "relative_distance", "subspace_overlap"]


def relative_distance(reference: Kernel, kernel: Kernel) -> Float[Array, ""]:
    r"""Relative Frobenius distance :math:`\|Θ_0 - Θ\|_F / \|Θ_0\|_F` (NaN for a zero reference)."""
    reference, kernel = _pair(reference, kernel)
    return relative_distance_of(reference, kernel)


def cosine_distance(reference: Kernel, kernel: Kernel) -> Float[Array, ""]:
    r"""One minus the cosine between the kernels in the Frobenius inner product.

    .. math::
       d = 1 - \frac{⟨Θ_0, Θ⟩_F}{\|Θ_0\|_F \, \|Θ\|_F} \in [0, 2]

    Insensitive to a global rescaling of either kernel.
    """
    reference, kernel = _pair(reference, kernel)
    return cosine_distance_of(reference, kernel)


def subspace_overlap(reference: Kernel, kernel: Kernel, k: int) -> Float[Array, ""]:
    r"""Overlap of the top-``k`` eigenspaces of the two kernels.

    .. math::
       o_k = \|U_0^⊤ U\|_F^2 / k \in [0, 1]

    where the columns of :math:`U_0, U \in \mathbb R^{n×k}` are the orthonormal eigenvectors of the
    ``k`` largest eigenvalues. 1 when the subspaces coincide, about ``k/n`` for random subspaces; ill
    defined (but finite) when :math:`λ_k = λ_{k+1}`.
    """
    reference, kernel = _pair(reference, kernel)
    if not 1 <= k <= kernel.shape[0]:
        raise ValueError(f"k must satisfy 1 <= k <= n = {kernel.shape[0]}; got k={k}.")
    return subspace_overlap_of(symmetric_eigh(reference)[1][:, :k], symmetric_eigh(kernel)[1][:, :k])


def kernel_velocity(previous: Kernel, kernel: Kernel, steps: Int[Array, ""] | int) -> Float[Array, ""]:
    r"""Kernel velocity: the relative distance travelled per training step between two kernels.

    .. math::
       v = \frac{\|Θ_{t} - Θ_{t - Δ}\|_F}{\|Θ_{t - Δ}\|_F \, Δ}

    with :math:`Δ` = ``steps`` between the kernels (Fort et al. 2020, arXiv 2010.15110, section 4: the
    kernel moves fast early in training, then slows down). NaN for a zero previous kernel.
    """
    previous, kernel = _pair(previous, kernel)
    return relative_distance_of(previous, kernel) / steps


def _pair(reference: jax.Array, kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
    reference, kernel = as_matrix(reference, "reference"), as_matrix(kernel)
    if reference.shape != kernel.shape:
        raise ValueError(
            f"reference and kernel must have the same shape; got {reference.shape} and {kernel.shape}."
        )
    return reference, kernel


def relative_distance_of(reference: jax.Array, kernel: jax.Array) -> jax.Array:
    return jnp.linalg.norm(reference - kernel) / jnp.linalg.norm(reference)


def cosine_distance_of(reference: jax.Array, kernel: jax.Array) -> jax.Array:
    return 1.0 - jnp.vdot(reference, kernel) / (jnp.linalg.norm(reference) * jnp.linalg.norm(kernel))


def subspace_overlap_of(reference_vectors: jax.Array, vectors: jax.Array) -> jax.Array:
    return jnp.sum((reference_vectors.T @ vectors) ** 2) / vectors.shape[1]
