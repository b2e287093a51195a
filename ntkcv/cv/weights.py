r"""Data-free weight-spectrum metrics of a parameter pytree, in the style of WeightWatcher.

Heavy-tailed self-regularisation (Martin & Mahoney, arXiv 1901.08278): the empirical spectral density
of each layer's correlation matrix :math:`X = W^⊤W / N` develops a power-law tail
:math:`ρ(λ) ∝ λ^{-α}` as training extracts correlations; :math:`α ≈ 2–4` is typical of well-trained
layers. Layers are the leaves named ``kernel`` of a params pytree: Dense kernels ``(in, out)`` and
convolution kernels ``(*spatial, in, out)``, sliced into one ``(in, out)`` matrix per spatial position
with the eigenvalues of all slices pooled (as WeightWatcher does). Runs in NumPy on the host.

Normalisation: :math:`λ_i = σ_i^2 / N` with :math:`σ_i` the singular values of each slice and
:math:`N = \max(\text{in}, \text{out})`, WeightWatcher's ``normalize=True`` and Martin & Mahoney's
:math:`X`. Each slice contributes :math:`\min(\text{in}, \text{out})` eigenvalues (the zeros of
:math:`W^⊤W` beyond its rank are dropped). α does not depend on this choice; the norms do.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

__all__ = [
    "LayerSpectrum",
    "PowerLawFit",
    "WeightSpectra",
    "fit_power_law",
    "layer_eigenvalues",
    "weight_spectra",
]


@dataclasses.dataclass(frozen=True)
class PowerLawFit:
    r"""Continuous power law :math:`p(λ) = \frac{α-1}{λ_{\min}} (λ/λ_{\min})^{-α}` fitted to a tail."""

    alpha: float
    alpha_stderr: float
    xmin: float
    ks_distance: float
    num_tail: int


@dataclasses.dataclass(frozen=True)
class LayerSpectrum:
    """Weight-spectrum metrics of one layer (see :func:`weight_spectra` for the definitions)."""

    num_eigenvalues: int
    power_law: PowerLawFit
    alpha_weighted: float
    log10_spectral_norm: float
    log10_frobenius_norm: float
    stable_rank: float
    matrix_entropy: float


@dataclasses.dataclass(frozen=True)
class WeightSpectra:
    """Per-layer metrics keyed by pytree path (``"Dense_0/kernel"``), skipped layers with the reason,
    and ``summary``: the mean of each metric over the fitted layers."""

    layers: dict[str, LayerSpectrum]
    skipped: dict[str, str]
    summary: dict[str, float]


def weight_spectra(params: Any, *, min_eigenvalues: int = 10) -> WeightSpectra:
    r"""Weight-spectrum metrics of every ``kernel`` leaf of ``params`` with ``ndim ≥ 2``.

    With the pooled eigenvalues :math:`λ_1 ≥ … ≥ λ_M` of a layer (module doc):

    .. math::
       \hat α = α \log_{10} λ_1, \quad \log_{10} \|W\|_2^2/N = \log_{10} λ_1, \quad
       \log_{10} \|W\|_F^2/N = \log_{10} \textstyle\sum_i λ_i, \quad
       r_s = \frac{\|W\|_F^2}{\|W\|_2^2} = \frac{\sum_i λ_i}{λ_1}, \quad
       H = \frac{-\sum_i p_i \ln p_i}{\ln R}, \; p_i = \frac{λ_i}{\sum_j λ_j}

    with α from :func:`fit_power_law`, ``R`` the number of non-zero eigenvalues (``H`` is NaN for
    ``R = 1``), and WeightWatcher's conventions: the "spectral norm" and "Frobenius norm" are those
    of the eigenvalues, i.e. squared norms of :math:`W / \sqrt N`. Layers with fewer than
    ``min_eigenvalues`` non-zero eigenvalues (WeightWatcher's default: 10) or non-finite weights are skipped.

    Reference: Martin & Mahoney, "Traditional and heavy-tailed self regularization in neural network
    models", arXiv 1901.08278; Martin, Peng & Mahoney, Nat. Commun. 12 (2021) (α̂ and the norms).
    """
    layers, skipped = {}, {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if _key_name(path[-1]) != "kernel" or np.ndim(leaf) < 2:
            continue
        name = "/".join(_key_name(key) for key in path)
        if not np.all(np.isfinite(leaf)):
            skipped[name] = "non-finite weights (NaN or inf)"
            continue
        eigenvalues = layer_eigenvalues(leaf)
        nonzero = eigenvalues[eigenvalues > eigenvalues[0] * eigenvalues.size * np.finfo(np.float64).eps]
        if nonzero.size < min_eigenvalues:
            skipped[name] = f"{nonzero.size} non-zero eigenvalues < min_eigenvalues={min_eigenvalues}"
            continue
        fit = fit_power_law(nonzero)
        if not np.isfinite(fit.alpha):
            skipped[name] = "power-law fit failed: fewer than two distinct eigenvalues"
            continue
        layers[name] = _layer_spectrum(eigenvalues.size, nonzero, fit)
    return WeightSpectra(layers, skipped, _summary(layers))


def layer_eigenvalues(kernel: Any) -> np.ndarray:
    r"""Pooled eigenvalues :math:`σ^2 / \max(\text{in}, \text{out})` of a ``(*spatial, in, out)`` kernel.

    Descending, ``prod(spatial) · min(in, out)`` of them.
    """
    kernel = np.asarray(kernel, dtype=np.float64)
    if kernel.ndim < 2:
        raise ValueError(f"kernel must have ndim >= 2 (*spatial, in, out); got shape {kernel.shape}.")
    slices = kernel.reshape(-1, *kernel.shape[-2:])
    singular_values = np.linalg.svd(slices, compute_uv=False).ravel()
    return np.sort(singular_values**2 / max(kernel.shape[-2:]))[::-1]


def fit_power_law(eigenvalues: Any) -> PowerLawFit:
    r"""Maximum-likelihood continuous power law with :math:`x_{\min}` by minimal KS distance (Clauset et al.).

    For each candidate :math:`x_{\min}` among the distinct values (all but the largest), the
    :math:`n` values :math:`x_i ≥ x_{\min}` give

    .. math::
       α = 1 + n \Big/ \sum_{i} \ln(x_i / x_{\min}), \qquad
       D = \max_i \Big| \tfrac{i}{n} - \big(1 - (x_{(i)}/x_{\min})^{1-α}\big) \Big|, \; i = 0, …, n-1

    (empirical CDF as in Clauset's ``plfit`` and the ``powerlaw`` package); the candidate with the
    smallest :math:`D` wins, with standard error :math:`(α - 1)/\sqrt n`. Values must be positive.
    Fewer than two distinct values give NaN. :math:`O(n^2)` time, :math:`O(n)` memory.

    Reference: Clauset, Shalizi & Newman, "Power-law distributions in empirical data", SIAM Review 51
    (2009), arXiv 0706.1062.
    """
    x = np.sort(np.asarray(eigenvalues, dtype=np.float64).ravel())
    if x.size == 0 or x[0] <= 0:
        raise ValueError(f"eigenvalues must be non-empty and positive; got min {x.min(initial=0)}.")
    candidates = np.unique(x, return_index=True)[1][:-1]
    log_x = np.log(x)
    tail_log_sums = np.cumsum(log_x[::-1])[::-1]
    best = PowerLawFit(math.nan, math.nan, math.nan, math.inf, 0)
    for start in candidates:
        num_tail = x.size - start
        alpha = 1.0 + num_tail / (tail_log_sums[start] - num_tail * log_x[start])
        model_cdf = 1.0 - np.exp((1.0 - alpha) * (log_x[start:] - log_x[start]))
        distance = np.max(np.abs(np.arange(num_tail) / num_tail - model_cdf))
        if distance < best.ks_distance:
            best = PowerLawFit(alpha, (alpha - 1.0) / math.sqrt(num_tail), x[start], distance, num_tail)
    return best


def _layer_spectrum(num_eigenvalues: int, nonzero: np.ndarray, fit: PowerLawFit) -> LayerSpectrum:
    largest, total = nonzero[0], nonzero.sum()
    p = nonzero / total
    entropy = -np.sum(p * np.log(p)) / np.log(nonzero.size) if nonzero.size > 1 else math.nan
    return LayerSpectrum(
        num_eigenvalues=num_eigenvalues,
        power_law=fit,
        alpha_weighted=fit.alpha * math.log10(largest),
        log10_spectral_norm=math.log10(largest),
        log10_frobenius_norm=math.log10(total),
        stable_rank=total / largest,
        matrix_entropy=float(entropy),
    )


def _summary(layers: dict[str, LayerSpectrum]) -> dict[str, float]:
    rows = [
        {
            "alpha": layer.power_law.alpha,
            "alpha_weighted": layer.alpha_weighted,
            "log10_spectral_norm": layer.log10_spectral_norm,
            "log10_frobenius_norm": layer.log10_frobenius_norm,
            "stable_rank": layer.stable_rank,
            "matrix_entropy": layer.matrix_entropy,
        }
        for layer in layers.values()
    ]
    if not rows:
        return {}
    return {key: float(np.mean([row[key] for row in rows])) for key in rows[0]}


def _key_name(key: Any) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)
