r"""Kernel–target alignment: how well the NTK's geometry matches the labels (Cristianini et al. 2001).

Targets ``Y`` may be integer labels ``(N,)`` (one-hot encoded: :math:`(YY^⊤)_{ij} = [y_i = y_j]`),
one-hot labels or regression targets ``(N, C)``, or float regression targets ``(N,)`` (read as
``(N, 1)``). For a traced ``(N, N)`` kernel the target kernel is :math:`YY^⊤`; for a full
``(N·C, N·C)`` kernel (rows ordered ``(sample, output)``) it is :math:`\operatorname{vec}(Y)
\operatorname{vec}(Y)^⊤`, integer labels being one-hot encoded over the ``C = n / N`` outputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Real

from ntkcv.cv._kernel import Kernel, as_matrix

__all__ = ["centred_target_alignment", "cross_target_alignment", "target_alignment", "target_kernel"]


def target_alignment(kernel: Kernel, targets: Real[Array, " N"] | Real[Array, "N C"]) -> Float[Array, ""]:
    r"""Kernel–target alignment, the cosine between Θ and the target kernel :math:`T = YY^⊤`.

    .. math::
       A(Θ, T) = \frac{⟨Θ, T⟩_F}{\|Θ\|_F \, \|T\|_F} \in [-1, 1]

    Equal to 1 when :math:`Θ = c\,YY^⊤`. NaN for a zero kernel or zero targets.

    Reference: Cristianini, Shawe-Taylor, Elisseeff & Kandola, "On kernel-target alignment", NeurIPS 2001.
    """
    matrix = as_matrix(kernel)
    return target_alignment_of(matrix, target_kernel(targets, matrix.shape[0]))


def centred_target_alignment(kernel: Kernel, targets: Real[Array, " N"] | Real[Array, "N C"]) -> Float[Array, ""]:
    r"""Centred kernel–target alignment (Cortes, Mohri & Rostamizadeh 2012).

    .. math::
       A_c(Θ, T) = \frac{⟨HΘH, HTH⟩_F}{\|HΘH\|_F \, \|HTH\|_F}, \qquad
       H = I_n - \tfrac1n \mathbf 1 \mathbf 1^⊤

    Centring removes the constant component that makes the plain alignment of any two PSD kernels
    positive. NaN when either centred kernel vanishes (e.g. a single class).

    Reference: Cortes, Mohri & Rostamizadeh, "Algorithms for learning kernels based on centered
    alignment", JMLR 13 (2012).
    """
    matrix = as_matrix(kernel)
    return centred_target_alignment_of(matrix, target_kernel(targets, matrix.shape[0]))


def cross_target_alignment(
    kernel: Float[Array, "Na Nb"],
    targets_a: Real[Array, " Na"] | Real[Array, "Na C"],
    targets_b: Real[Array, " Nb"] | Real[Array, "Nb C"],
) -> Float[Array, ""]:
    r"""Alignment of a traced cross kernel :math:`Θ_{ab}` ``(N_a, N_b)`` (e.g. test × train) with the targets.

    .. math::
       A(Θ_{ab}, Y_a Y_b^⊤) = \frac{⟨Θ_{ab}, Y_a Y_b^⊤⟩_F}{\|Θ_{ab}\|_F \, \|Y_a Y_b^⊤\|_F}

    Integer labels ``(N,)`` give :math:`(Y_a Y_b^⊤)_{ij} = [y^a_i = y^b_j]`; targets ``(N, C)`` their products.
    How well the kernel that carries training information to held-out points matches their labels.
    """
    kernel = jnp.asarray(kernel)
    targets_a, targets_b = jnp.asarray(targets_a), jnp.asarray(targets_b)
    if kernel.ndim != 2 or (kernel.shape[0], kernel.shape[1]) != (targets_a.shape[0], targets_b.shape[0]):
        raise ValueError(f"kernel must be a traced cross kernel (N_a, N_b) = ({targets_a.shape[0]}, "
                         f"{targets_b.shape[0]}); got shape {kernel.shape}.")
    if jnp.issubdtype(targets_a.dtype, jnp.integer) and targets_a.ndim == 1:
        target = (targets_a[:, None] == targets_b[None, :]).astype(kernel.dtype)
    else:
        target = targets_a.reshape(targets_a.shape[0], -1) @ targets_b.reshape(targets_b.shape[0], -1).T
    return target_alignment_of(kernel, target)


def target_kernel(targets: Real[Array, " N"] | Real[Array, "N C"], n: int) -> Float[Array, "n n"]:
    """The ``(n, n)`` target kernel :math:`YY^⊤` for a kernel of matrix size ``n`` (see module doc)."""
    targets = jnp.asarray(targets)
    num = targets.shape[0] if targets.ndim else 0
    if targets.ndim not in (1, 2) or num == 0 or n % num:
        raise ValueError(
            f"targets must have shape (N,) or (N, C) with n = {n} a multiple of N; got shape {targets.shape}."
        )
    outputs = n // num
    if jnp.issubdtype(targets.dtype, jnp.integer) and targets.ndim == 1:
        if outputs == 1:
            return (targets[:, None] == targets[None, :]).astype(jnp.result_type(float))
        targets = jax.nn.one_hot(targets, outputs)
    targets = targets.astype(jnp.result_type(float)).reshape(num, -1)
    if targets.shape[1] == outputs:
        flat = targets.reshape(n, 1)
    elif outputs == 1:
        flat = targets
    else:
        raise ValueError(
            f"targets of shape {targets.shape} do not match a full kernel of size n = {n} "
            f"(expected (N, {outputs}))."
        )
    return flat @ flat.T


def centre(matrix: jax.Array) -> jax.Array:
    r""":math:`HAH` with :math:`H = I - \mathbf 1 \mathbf 1^⊤ / n`, without forming ``H``."""
    matrix = matrix - jnp.mean(matrix, axis=0, keepdims=True)
    return matrix - jnp.mean(matrix, axis=1, keepdims=True)


def target_alignment_of(matrix: jax.Array, target: jax.Array) -> jax.Array:
    return jnp.vdot(matrix, target) / (jnp.linalg.norm(matrix) * jnp.linalg.norm(target))


def centred_target_alignment_of(matrix: jax.Array, target: jax.Array) -> jax.Array:
    return target_alignment_of(centre(matrix), centre(target))
