"""All collective variables of a kernel in one ``jit``-able pass sharing one eigendecomposition."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Real

from ntkcv.cv import alignment, classwise, drift, normalised, spectral
from ntkcv.cv._kernel import Kernel, as_matrix, symmetric_eigh, symmetric_eigvalsh

__all__ = ["AVAILABLE", "collective_variables"]


class _Inputs(NamedTuple):
    matrix: jax.Array  # (n, n)
    eigenvalues: jax.Array  # (n,), descending
    eigenvectors: jax.Array | None  # (n, top_k) leading eigenvectors, only for subspace_overlap
    num_samples: int
    top_k: int
    labels: jax.Array | None
    num_classes: int | None
    reference: jax.Array | None  # (n, n)


# name -> (what it needs besides the kernel, function of the shared inputs)
_CVS: dict[str, tuple[str | None, Callable[[_Inputs], jax.Array]]] = {
    "entropy": (None, lambda c: spectral.entropy_of(c.eigenvalues)),
    "effective_entropy": (None, lambda c: spectral.effective_entropy_of(c.eigenvalues)),
    "trace": (None, lambda c: jnp.trace(c.matrix)),
    "mean_trace": (None, lambda c: jnp.trace(c.matrix) / c.num_samples),
    "top_eigenvalues": (None, lambda c: c.eigenvalues[: c.top_k]),
    "effective_rank": (None, lambda c: spectral.effective_rank_of(c.eigenvalues)),
    "participation_ratio": (None, lambda c: spectral.participation_ratio_of(c.eigenvalues)),
    "max_eigenvalue": (None, lambda c: c.eigenvalues[0]),
    "condition_number": (None, lambda c: spectral.condition_number_of(c.eigenvalues)),
    "frobenius_norm": (None, lambda c: jnp.linalg.norm(c.matrix)),
    "negative_mass": (None, lambda c: spectral.negative_mass_of(c.eigenvalues)),
    "cosine_entropy": (None, lambda c: normalised.cosine_entropy_of(c.matrix)),
    "magnitude_entropy": (None, lambda c: normalised.magnitude_entropy_of(c.matrix)),
    "magnitude_variance": (None, lambda c: normalised.magnitude_variance_of(c.matrix)),
    "target_alignment": ("labels", lambda c: alignment.target_alignment_of(c.matrix, _target(c))),
    "centred_target_alignment": (
        "labels",
        lambda c: alignment.centred_target_alignment_of(c.matrix, _target(c)),
    ),
    "class_entropy": ("labels", lambda c: classwise.classwise_entropy_of(c.matrix, _masks(c))),
    "class_trace": ("labels", lambda c: classwise.classwise_trace_of(c.matrix, _masks(c))),
    "relative_distance": ("reference", lambda c: drift.relative_distance_of(c.reference, c.matrix)),
    "cosine_distance": ("reference", lambda c: drift.cosine_distance_of(c.reference, c.matrix)),
    "subspace_overlap": (
        "reference",
        lambda c: drift.subspace_overlap_of(symmetric_eigh(c.reference)[1][:, : c.top_k], c.eigenvectors),
    ),
}

#: Names accepted by :func:`collective_variables`, in the order of its output.
AVAILABLE: tuple[str, ...] = tuple(_CVS)

#: What each CV needs besides the kernel: ``"labels"`` (probe labels or targets), ``"reference"`` (a reference
#: kernel) or ``None``.
REQUIREMENTS: dict[str, str | None] = {name: needs for name, (needs, _) in _CVS.items()}
#: The CVs that need integer class labels (regression targets will not do).
CLASSWISE: tuple[str, ...] = ("class_entropy", "class_trace")
_VECTOR_CVS = ("top_eigenvalues", "class_entropy", "class_trace")


def collective_variables(
    kernel: Kernel,
    names: Sequence[str] | None = None,
    *,
    labels: Real[Array, " N"] | Real[Array, "N C"] | None = None,
    reference: Kernel | None = None,
    top_k: int = 10,
    num_classes: int | None = None,
    eigenvalues: Float[Array, " n"] | None = None,
    warn: bool = True,
) -> dict[str, Float[Array, ""]]:
    """Compute the named collective variables of ``kernel`` sharing one eigendecomposition.

    ``eigvalsh`` runs once on the kernel (``eigh`` instead when ``subspace_overlap`` is requested, plus
    one ``eigh`` of the reference); ``cosine_entropy`` and ``class_entropy`` need eigendecompositions
    of other matrices. Each CV's formula and conventions are in the docstring of its function in
    :mod:`ntkcv.cv` (``class_entropy`` is :func:`~ntkcv.cv.classwise_entropy`, ``target_alignment``
    :func:`~ntkcv.cv.target_alignment`, …). Pure and ``jit``-able with ``names``, ``top_k`` and
    ``num_classes`` static; a kernel with non-finite entries or equal to zero warns once (unless ``warn``
    is false).

    Args:
      kernel: ``(N, N)``, ``(N·K, N·K)`` or ``(N, N, K, K)`` kernel.
      names: CVs to compute, any of :data:`AVAILABLE`. ``None`` computes every CV whose inputs were
        given (``labels`` for alignment and class-wise CVs, ``reference`` for drift; class-wise CVs
        only for integer labels).
      labels: targets for the alignments (integer labels ``(N,)``, one-hot or regression targets
        ``(N, C)``; see :func:`~ntkcv.cv.target_kernel`), integer labels ``(N,)`` for class-wise CVs.
      reference: kernel of the same shape to measure drift from (e.g. the kernel at initialisation).
      top_k: number of leading eigenvalues reported and the subspace dimension of
        ``subspace_overlap``; clipped to the matrix size ``n``.
      num_classes: number of classes for class-wise CVs; inferred as ``max(labels) + 1`` when the
        labels are concrete, required under ``jit``.
      eigenvalues: the kernel's eigenvalues in descending order if already computed (e.g. by
        :func:`~ntkcv.cv.spectrum`), so that no second ``eigvalsh`` runs.
      warn: warn at run time when the kernel (or ``reference``) has non-finite entries or is zero. The
        warning is a host callback inside the compiled program; with ``False`` the program has none, so
        JAX's persistent compilation cache can store it, and the caller checks the (NaN) results itself.

    Returns:
      ``{name: scalar}``. Vector CVs are split into scalars ``"name/i"``: ``top_eigenvalues/0`` is
      :math:`λ_1`, ``class_entropy/c`` is the entropy of class ``c``.

    Example:
      >>> import jax.numpy as jnp
      >>> from ntkcv.cv import collective_variables
      >>> cvs = collective_variables(jnp.eye(4), ["entropy", "trace"])
      >>> round(float(cvs["entropy"]), 4), float(cvs["trace"])
      (1.3863, 4.0)
    """
    provided = {"labels": labels is not None, "reference": reference is not None}
    names = _resolve_names(names, provided, labels)
    matrix = as_matrix(kernel, warn=warn)
    n = matrix.shape[0]
    top_k = min(top_k, n)
    if top_k < 1:
        raise ValueError(f"top_k must be a positive integer; got {top_k}.")
    if "subspace_overlap" in names:
        eigenvalues, eigenvectors = symmetric_eigh(matrix)
        eigenvectors = eigenvectors[:, :top_k]
    else:
        eigenvalues, eigenvectors = (symmetric_eigvalsh(matrix) if eigenvalues is None else eigenvalues), None
    if reference is not None:
        reference = as_matrix(reference, "reference", warn=warn)
        if reference.shape != matrix.shape:
            raise ValueError(f"reference must have the kernel's shape {matrix.shape}; got {reference.shape}.")
    if any(name in CLASSWISE for name in names):
        num_classes = _num_classes(labels, num_classes)
    inputs = _Inputs(
        matrix, eigenvalues, eigenvectors, jnp.shape(kernel)[0], top_k, labels, num_classes, reference
    )
    result = {}
    for name in names:
        value = _CVS[name][1](inputs)
        if name in _VECTOR_CVS:
            result.update({f"{name}/{i}": value[i] for i in range(value.shape[0])})
        else:
            result[name] = value
    return result


def _resolve_names(names, provided, labels) -> tuple[str, ...]:
    if names is None:
        integer_labels = labels is not None and jnp.issubdtype(jnp.asarray(labels).dtype, jnp.integer)
        return tuple(
            name
            for name, (needs, _) in _CVS.items()
            if (needs is None or provided[needs]) and (name not in CLASSWISE or integer_labels)
        )
    if isinstance(names, str):
        raise TypeError(f"names must be a sequence of CV names, not a string; got {names!r}.")
    unknown = [name for name in names if name not in _CVS]
    if unknown:
        raise ValueError(f"Unknown collective variables {unknown}; allowed names are {list(AVAILABLE)}.")
    for name in names:
        needs = _CVS[name][0]
        if needs is not None and not provided[needs]:
            raise ValueError(f"collective variable {name!r} needs the `{needs}` argument, which is None.")
    return tuple(dict.fromkeys(names))


def _num_classes(labels: jax.Array, num_classes: int | None) -> int:
    if num_classes is not None:
        return num_classes
    try:
        return int(np.max(np.asarray(labels))) + 1
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        raise ValueError("num_classes must be given for class-wise CVs when labels are traced; got None.") from None


def _target(inputs: _Inputs) -> jax.Array:
    return alignment.target_kernel(inputs.labels, inputs.matrix.shape[0])


def _masks(inputs: _Inputs) -> jax.Array:
    return classwise.class_masks(inputs.labels, inputs.num_classes, inputs.matrix.shape[0])
