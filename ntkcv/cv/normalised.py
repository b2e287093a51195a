r"""Collective variables of the normalised kernel: its shape (cosine kernel) and scale (diagonal magnitudes).

The cosine kernel separates the geometry of the NTK from the magnitude of each sample's gradient, and
the magnitude distribution describes that magnitude alone (Tovey et al., arXiv 2410.07451). Kernels are
validated as in :mod:`ntkcv.cv.spectral`; for a full kernel every (sample, output) row counts as one item.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import entr
from jaxtyping import Array, Float

from ntkcv.cv._kernel import Kernel, as_matrix, symmetric_eigvalsh
from ntkcv.cv.spectral import entropy_of

__all__ = [
    "cosine_entropy",
    "cosine_kernel",
    "magnitude_distribution",
    "magnitude_entropy",
    "magnitude_variance",
]


def cosine_kernel(kernel: Kernel) -> Float[Array, "n n"]:
    r"""Cosine-normalised kernel, the matrix of cosines between per-sample gradients.

    .. math::
       \hat Θ_{ij} = Θ_{ij} / \sqrt{Θ_{ii} Θ_{jj}}

    Unit diagonal, entries in ``[-1, 1]``. A row with a zero (or negative) diagonal entry gives NaN.
    """
    return cosine_kernel_of(as_matrix(kernel))


def cosine_entropy(kernel: Kernel) -> Float[Array, ""]:
    r"""Von Neumann entropy of the cosine kernel, :math:`S(\hat Θ)` with :math:`\operatorname{tr}\hat Θ = n`.

    Conventions as in :func:`ntkcv.cv.entropy` (clipped eigenvalues, natural log, 0 ln 0 = 0).
    """
    return cosine_entropy_of(as_matrix(kernel))


def magnitude_distribution(kernel: Kernel) -> Float[Array, " n"]:
    r"""Distribution of gradient magnitudes over the ``n`` rows.

    .. math::
       p_i = \sqrt{Θ_{ii}^+} \Big/ \sum_j \sqrt{Θ_{jj}^+}, \qquad Θ_{ii}^+ = \max(Θ_{ii}, 0)

    :math:`\sqrt{Θ_{ii}} = \|∇_θ f(x_i)\|`. NaN for a kernel with a zero diagonal.
    """
    return magnitude_distribution_of(as_matrix(kernel))


def magnitude_entropy(kernel: Kernel) -> Float[Array, ""]:
    r"""Shannon entropy of the magnitude distribution, :math:`-\sum_i p_i \ln p_i \in [0, \ln n]`."""
    return magnitude_entropy_of(as_matrix(kernel))


def magnitude_variance(kernel: Kernel) -> Float[Array, ""]:
    r"""Variance of the rescaled magnitudes :math:`n p_i` (mean 1), zero when all gradients are equally large.

    .. math::
       \operatorname{Var}(n p) = \frac{1}{n} \sum_i (n p_i - 1)^2
    """
    return magnitude_variance_of(as_matrix(kernel))


# Functions of a validated square matrix, shared with ``collective_variables``.


def cosine_kernel_of(matrix: jax.Array) -> jax.Array:
    scale = jax.lax.rsqrt(jnp.diagonal(matrix))
    return matrix * scale[:, None] * scale[None, :]


def cosine_entropy_of(matrix: jax.Array) -> jax.Array:
    return entropy_of(symmetric_eigvalsh(cosine_kernel_of(matrix)))


def magnitude_distribution_of(matrix: jax.Array) -> jax.Array:
    magnitude = jnp.sqrt(jnp.clip(jnp.diagonal(matrix), 0.0))
    return magnitude / jnp.sum(magnitude)


def magnitude_entropy_of(matrix: jax.Array) -> jax.Array:
    return jnp.sum(entr(magnitude_distribution_of(matrix)))


def magnitude_variance_of(matrix: jax.Array) -> jax.Array:
    p = magnitude_distribution_of(matrix)
    return jnp.var(p.shape[0] * p)
