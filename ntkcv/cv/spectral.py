r"""Spectral collective variables of an empirical NTK Θ (Tovey et al., arXiv 2305.00995, 2410.07451).

Every function takes a kernel: a traced ``(N, N)`` matrix, a full ``(N·K, N·K)`` matrix or a 4-D
``(N, N, K, K)`` kernel, which is flattened to ``(N·K, N·K)`` with rows ordered ``(sample, output)``.
Write :math:`λ_1 ≥ … ≥ λ_n` for the eigenvalues of the symmetric part :math:`(Θ + Θ^⊤)/2` and
:math:`λ_i^+ = \max(λ_i, 0)` for the clipped ones: an NTK is positive semi-definite, so negative
eigenvalues are round-off, and :func:`negative_mass` reports how much was clipped.
"""

from __future__ import annotations

import warnings

import jax.numpy as jnp
from jax.scipy.special import entr
from jaxtyping import Array, Float

from ntkcv.cv._kernel import Kernel, as_matrix, symmetric_eigvalsh

__all__ = [
    "condition_number",
    "effective_entropy",
    "effective_rank",
    "entropy",
    "frobenius_norm",
    "max_eigenvalue",
    "mean_trace",
    "negative_mass",
    "participation_ratio",
    "spectrum",
    "top_eigenvalues",
    "trace",
]


def entropy(kernel: Kernel) -> Float[Array, ""]:
    r"""Von Neumann entropy of the density matrix :math:`ρ = Θ / \operatorname{tr} Θ`.

    .. math::
       S = -\sum_i p_i \ln p_i, \qquad p_i = λ_i^+ / \sum_j λ_j^+, \qquad 0 \ln 0 = 0,

    so :math:`0 ≤ S ≤ \ln n`; :math:`S = 0` for a rank-one kernel and :math:`\ln n` for :math:`c I_n`.
    Natural logarithm. A zero (or non-finite) kernel gives NaN with a ``RuntimeWarning``.

    References: Tovey et al., "Towards a phenomenological understanding of neural networks: data", arXiv
    2305.00995; Tovey et al., "Collective variables of neural networks: empirical time evolution and scaling laws",
    arXiv 2410.07451.
    """
    return entropy_of(eigenvalues(kernel))


def effective_entropy(kernel: Kernel) -> Float[Array, ""]:
    r"""Entropy normalised by its maximum, :math:`S / \ln n \in [0, 1]`.

    ``n`` is the kernel's matrix size; ``n = 1`` gives NaN (``0/0``) with a ``RuntimeWarning``.
    """
    return effective_entropy_of(eigenvalues(kernel))


def trace(kernel: Kernel) -> Float[Array, ""]:
    r"""Trace :math:`\operatorname{tr} Θ = \sum_i Θ_{ii} = \sum_i λ_i` (unclipped)."""
    return jnp.trace(as_matrix(kernel))


def mean_trace(kernel: Kernel) -> Float[Array, ""]:
    r"""Trace per sample, :math:`\operatorname{tr} Θ / N`, with ``N = kernel.shape[0]`` as passed.

    For a 4-D ``(N, N, K, K)`` kernel ``N`` is the number of samples, so this sums over the ``K`` outputs.
    """
    return trace(kernel) / jnp.shape(kernel)[0]


def spectrum(kernel: Kernel, *, warn: bool = True) -> Float[Array, " n"]:
    r"""All eigenvalues :math:`λ_1 ≥ … ≥ λ_n` of :math:`(Θ + Θ^⊤)/2`, descending and unclipped.

    ``warn=False`` drops the run-time warning for a non-finite or zero kernel (a host callback), as in
    :func:`~ntkcv.cv.collective_variables`.
    """
    return eigenvalues(kernel, warn=warn)


def top_eigenvalues(kernel: Kernel, k: int) -> Float[Array, " k"]:
    r"""The ``k`` largest eigenvalues :math:`λ_1 ≥ … ≥ λ_k`; ``1 ≤ k ≤ n``."""
    lam = eigenvalues(kernel)
    if not 1 <= k <= lam.shape[0]:
        raise ValueError(f"k must satisfy 1 <= k <= n = {lam.shape[0]}; got k={k}.")
    return lam[:k]


def effective_rank(kernel: Kernel) -> Float[Array, ""]:
    r"""Effective rank :math:`e^{S}` (Roy & Vetterli 2007): ``n`` for :math:`c I_n`, 1 for rank one."""
    return effective_rank_of(eigenvalues(kernel))


def participation_ratio(kernel: Kernel) -> Float[Array, ""]:
    r"""Participation ratio :math:`(\sum_i λ_i^+)^2 / \sum_i (λ_i^+)^2 \in [1, n]`; NaN for a zero kernel."""
    return participation_ratio_of(eigenvalues(kernel))


def max_eigenvalue(kernel: Kernel) -> Float[Array, ""]:
    r"""Largest eigenvalue :math:`λ_1` (sets the largest stable gradient-descent step, :math:`2/λ_1`)."""
    return eigenvalues(kernel)[0]


def condition_number(kernel: Kernel) -> Float[Array, ""]:
    r"""Condition number :math:`κ = λ_1 / λ_n`, and :math:`+∞` when :math:`λ_n ≤ 0` (singular kernel)."""
    return condition_number_of(eigenvalues(kernel))


def frobenius_norm(kernel: Kernel) -> Float[Array, ""]:
    r"""Frobenius norm :math:`\|Θ\|_F = (\sum_{ij} Θ_{ij}^2)^{1/2}`."""
    return jnp.linalg.norm(as_matrix(kernel))


def negative_mass(kernel: Kernel) -> Float[Array, ""]:
    r"""Relative mass of the negative eigenvalues that the other CVs clip away.

    .. math::
       m_- = \sum_{λ_i < 0} |λ_i| \Big/ \sum_i |λ_i|

    Zero for an exactly PSD kernel; of the order of the float epsilon for an NTK computed in floating
    point. A large value flags a kernel that is not an NTK (or a broken one). NaN for a zero kernel.
    """
    return negative_mass_of(eigenvalues(kernel))


def eigenvalues(kernel: Kernel, *, warn: bool = True) -> Float[Array, " n"]:
    """Validated kernel → eigenvalues of its symmetric part, descending."""
    return symmetric_eigvalsh(as_matrix(kernel, warn=warn))


# Functions of a descending eigenvalue vector, shared with ``collective_variables`` (one eigvalsh).


def probabilities_of(lam: Float[Array, " n"]) -> Float[Array, " n"]:
    positive = jnp.clip(lam, 0.0)
    return positive / jnp.sum(positive)


def entropy_of(lam: Float[Array, " n"]) -> Float[Array, ""]:
    return jnp.sum(entr(probabilities_of(lam)))


def effective_entropy_of(lam: Float[Array, " n"]) -> Float[Array, ""]:
    if lam.shape[0] == 1:
        warnings.warn("effective entropy of a 1x1 kernel is 0/0 = NaN.", RuntimeWarning, stacklevel=3)
    return entropy_of(lam) / jnp.log(lam.shape[0])


def effective_rank_of(lam: Float[Array, " n"]) -> Float[Array, ""]:
    return jnp.exp(entropy_of(lam))


def participation_ratio_of(lam: Float[Array, " n"]) -> Float[Array, ""]:
    positive = jnp.clip(lam, 0.0)
    return jnp.sum(positive) ** 2 / jnp.sum(positive**2)


def condition_number_of(lam: Float[Array, " n"]) -> Float[Array, ""]:
    return jnp.where(lam[-1] > 0, lam[0] / jnp.where(lam[-1] > 0, lam[-1], 1.0), jnp.inf)


def negative_mass_of(lam: Float[Array, " n"]) -> Float[Array, ""]:
    return jnp.sum(jnp.clip(-lam, 0.0)) / jnp.sum(jnp.abs(lam))
