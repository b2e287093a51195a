r"""Matrix-free estimators of NTK collective variables, for probe sets too large to build Θ.

The kernel enters only through a linear operator ``matvec: (n,) -> (n,)``, :math:`v ↦ Θv` (for the
NTK, a JVP followed by a VJP, which never materialises Θ). Every estimator is pure and ``jit``-able
when the operator is closed over::

    estimate_fn = jax.jit(lambda key: trace_hutchpp(matvec, key, n=n, num_matvecs=96))

Each returns an :class:`Estimate` (value and standard error) and costs a fixed budget of
matrix-vector products; memory is :math:`O(n × \text{probes})` (or :math:`O(n × \text{steps})` for a
Lanczos run), never :math:`O(n^2)`. The Krylov and probe machinery is `matfree`'s (Krämer et al.).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import xlogy
from jaxtyping import Array, Float, PRNGKeyArray
from matfree import decomp, stochtrace

__all__ = ["Estimate", "entropy_slq", "top_eigenvalues_lanczos", "trace_hutchinson", "trace_hutchpp"]

Matvec = Callable[[Float[Array, " n"]], Float[Array, " n"]]


class Estimate(NamedTuple):
    """A stochastic estimate and its standard error (same shape: a scalar, or ``(k,)`` eigenvalues)."""

    value: Float[Array, "*shape"]
    stderr: Float[Array, "*shape"]


def trace_hutchinson(
    matvec: Matvec, key: PRNGKeyArray, *, n: int, num_probes: int, dtype: jnp.dtype = jnp.float32
) -> Estimate:
    r"""Hutchinson's trace estimator with Rademacher probes :math:`v_j \in \{±1\}^n`.

    .. math::
       \widehat{\operatorname{tr}} Θ = \frac1m \sum_{j=1}^m v_j^⊤ Θ v_j, \qquad
       \operatorname{se} = \operatorname{std}_j(v_j^⊤ Θ v_j) / \sqrt m

    Unbiased, variance :math:`2\sum_{i≠j} Θ_{ij}^2 / m`: good for diagonally dominant kernels, poor
    for the low-rank kernels typical of NTKs (prefer :func:`trace_hutchpp`). Budget: ``num_probes``
    matvecs, memory :math:`O(n m)`.

    Reference: Hutchinson, Commun. Stat. Simul. Comput. 19 (1990).
    """
    sampler = stochtrace.sampler_signs(jnp.zeros((n,), dtype), num=num_probes)
    estimate = stochtrace.estimator_monte_carlo_mean_and_sem(stochtrace.monte_carlo_trace(), sampler)
    return Estimate(*estimate(matvec, key))


def trace_hutchpp(
    matvec: Matvec, key: PRNGKeyArray, *, n: int, num_matvecs: int, dtype: jnp.dtype = jnp.float32
) -> Estimate:
    r"""Variance-reduced trace by Hutch++ (Meyer, Musco, Musco & Woodruff 2021).

    A third of the budget sketches the range of Θ, :math:`Q = \operatorname{orth}(ΘS)` with
    :math:`S \in \{±1\}^{n×k}`; its trace is taken exactly and Hutchinson's estimator (with matfree's
    Monte-Carlo machinery) handles the deflated remainder, :math:`P = I - QQ^⊤`:

    .. math::
       \widehat{\operatorname{tr}} Θ = \operatorname{tr}(Q^⊤ΘQ) + \frac1r \sum_{j=1}^r v_j^⊤ PΘP v_j,
       \qquad \operatorname{se} = \operatorname{std}_j(v_j^⊤ PΘP v_j) / \sqrt r

    Given :math:`Q` the probes are i.i.d., so the standard error is an honest one. Nearly exact once
    ``k`` exceeds the kernel's effective rank, as for typical (low-rank) NTKs. Budget: ``num_matvecs``
    matvecs split as :math:`k = r = ⌊\text{num\_matvecs}/3⌋` (sketch ``k``, :math:`ΘQ` ``k``, probes
    the rest); memory :math:`O(nk)`.

    Reference: Meyer, Musco, Musco & Woodruff, "Hutch++: optimal stochastic trace estimation", SOSA 2021,
    arXiv 2010.09649.
    """
    sketch_size = num_matvecs // 3
    if not 1 <= sketch_size <= n:
        raise ValueError(f"num_matvecs must satisfy 3 <= num_matvecs <= 3n = {3 * n}; got {num_matvecs}.")
    sketch_key, probe_key = jax.random.split(key)
    sketch = jax.random.rademacher(sketch_key, (sketch_size, n), dtype)
    basis = jnp.linalg.qr(jax.vmap(matvec, out_axes=1)(sketch))[0]  # (n, k)
    exact = jnp.sum(basis * jax.vmap(matvec, in_axes=1, out_axes=1)(basis))

    def deflated_matvec(v):
        w = matvec(v - basis @ (basis.T @ v))
        return w - basis @ (basis.T @ w)

    remainder = trace_hutchinson(
        deflated_matvec, probe_key, n=n, num_probes=num_matvecs - 2 * sketch_size, dtype=dtype
    )
    return Estimate(exact + remainder.value, remainder.stderr)


def entropy_slq(
    matvec: Matvec,
    key: PRNGKeyArray,
    *,
    n: int,
    num_probes: int,
    num_matvecs: int,
    dtype: jnp.dtype = jnp.float32,
) -> Estimate:
    r"""Von Neumann entropy of :math:`ρ = Θ/\operatorname{tr}Θ` by stochastic Lanczos quadrature.

    Since :math:`S = -\operatorname{tr}(ρ \ln ρ) = \ln t - u/t` with :math:`t = \operatorname{tr}Θ` and
    :math:`u = \operatorname{tr}(Θ \ln Θ)`, each Rademacher probe :math:`v_j` yields both quadratic forms
    from one Lanczos run of ``num_matvecs`` steps, :math:`T = V^⊤ΘV = W \operatorname{diag}(θ) W^⊤`:

    .. math::
       t_j = \|v_j\|^2 \sum_k W_{1k}^2 θ_k^+, \qquad u_j = \|v_j\|^2 \sum_k W_{1k}^2 θ_k^+ \ln θ_k^+,
       \qquad \hat S = \ln \bar t - \bar u / \bar t

    (Ritz values clipped at zero, :math:`0 \ln 0 = 0`). The standard error follows by the delta method
    from the sample covariance of :math:`(t_j, u_j)`. Trace and :math:`\operatorname{tr}(Θ \ln Θ)` share
    the probes, so their errors largely cancel in :math:`\hat S`. Budget: ``num_probes × num_matvecs``
    matvecs (``num_matvecs ≤ n``), memory :math:`O(n × \text{num\_matvecs})` per probe.

    References: Ubaru, Chen & Saad, "Fast estimation of tr(f(A)) via stochastic Lanczos quadrature",
    SIAM J. Matrix Anal. Appl. 38 (2017); Tovey et al., arXiv 2305.00995 (the NTK entropy).
    """
    if not 1 <= num_matvecs <= n:
        raise ValueError(f"num_matvecs must satisfy 1 <= num_matvecs <= n = {n}; got {num_matvecs}.")
    if num_probes < 2:
        raise ValueError(f"num_probes must be at least 2 for a standard error; got {num_probes}.")
    tridiag = decomp.tridiag_sym(num_matvecs)

    def quadrature(probe):
        length_squared = jnp.vdot(probe, probe)
        _, tridiagonal, *_ = tridiag(matvec, probe / jnp.sqrt(length_squared))
        ritz_values, ritz_vectors = jnp.linalg.eigh(tridiagonal)
        weights = length_squared * ritz_vectors[0] ** 2
        ritz_values = jnp.clip(ritz_values, 0.0)
        return jnp.stack([weights @ ritz_values, weights @ xlogy(ritz_values, ritz_values)])

    probes = stochtrace.sampler_signs(jnp.zeros((n,), dtype), num=num_probes)(key)
    samples = jax.vmap(quadrature)(probes)  # (num_probes, 2): columns t_j, u_j
    t, u = jnp.mean(samples, axis=0)
    gradient = jnp.stack([1.0 / t + u / t**2, -1.0 / t])
    variance = gradient @ jnp.cov(samples, rowvar=False) @ gradient / num_probes
    return Estimate(jnp.log(t) - u / t, jnp.sqrt(variance))


def top_eigenvalues_lanczos(
    matvec: Matvec, key: PRNGKeyArray, *, n: int, k: int, num_matvecs: int, dtype: jnp.dtype = jnp.float32
) -> Estimate:
    r"""The ``k`` largest eigenvalues of a symmetric Θ by Lanczos with full reorthogonalisation.

    One Krylov space of dimension ``m = num_matvecs`` from a Gaussian start gives Ritz pairs
    :math:`(θ_i, Vs_i)`; their residuals bound the error (Kahan–Parlett: an eigenvalue of Θ lies within
    :math:`r_i` of :math:`θ_i`):

    .. math::
       r_i = \|ΘVs_i - θ_i Vs_i\| = β_m |s_{mi}|

    ``stderr`` holds :math:`r_i` — a deterministic error bound, not a statistical one — floored at
    :math:`\sqrt{m}\,ε\,|θ_1|` (round-off). Values are descending. Budget: ``num_matvecs`` matvecs
    (``k ≤ num_matvecs ≤ n``); a few times ``k`` usually converges the top eigenvalues. Memory
    :math:`O(n m)`.

    Reference: Parlett, "The Symmetric Eigenvalue Problem" (1998), §13.
    """
    if not 1 <= k <= num_matvecs <= n:
        raise ValueError(f"need 1 <= k <= num_matvecs <= n = {n}; got k={k}, num_matvecs={num_matvecs}.")
    start = jax.random.normal(key, (n,), dtype)
    _, tridiagonal, residual, _ = decomp.tridiag_sym(num_matvecs)(matvec, start / jnp.linalg.norm(start))
    ritz_values, ritz_vectors = jnp.linalg.eigh(tridiagonal)
    ritz_values, last_components = ritz_values[::-1][:k], ritz_vectors[-1, ::-1][:k]
    round_off = jnp.sqrt(num_matvecs) * jnp.finfo(dtype).eps * jnp.abs(ritz_values[0])
    return Estimate(ritz_values, jnp.maximum(jnp.linalg.norm(residual) * jnp.abs(last_components), round_off))
