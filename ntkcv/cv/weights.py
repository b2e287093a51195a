r"""Data-free weight-spectrum metrics of a parameter pytree, in the style of WeightWatcher.

Heavy-tailed self-regularisation (Martin & Mahoney, arXiv 1901.08278): the empirical spectral density
of each layer's correlation matrix :math:`X = W^⊤W / N` develops a power-law tail
:math:`ρ(λ) ∝ λ^{-α}` as training extracts correlations; :math:`α ≈ 2–4` is typical of well-trained
layers. Runs in NumPy on the host.

Layers (:func:`weight_layers`), found from the pytree paths of linen params and of the ``nnx.State`` of
:func:`ntkcv.from_nnx` (its trailing ``.value`` attribute is dropped):

- ``embedding`` leaves of rank 2 (``nn.Embed``, ``nnx.Embed``): one ``(vocab, features)`` matrix;
- ``kernel`` leaves of rank 2 (``Dense``, ``nnx.Linear``): one ``(in, out)`` matrix;
- rank ≥ 3 ``kernel`` leaves of a ``DenseGeneral`` / ``nnx.LinearGeneral``: one matrix, the input axes
  merged into rows and the feature axes into columns. Recognised as (a) the ``query``/``key``/``value``
  projections ``(in, heads, head_dim)`` → ``(in, heads·head_dim)`` and the ``out`` projection
  ``(heads, head_dim, out)`` → ``(heads·head_dim, out)`` of a module holding all four (linen
  ``MultiHeadDotProductAttention``/``SelfAttention``, ``nnx.MultiHeadAttention``), with or without biases;
  (b) any kernel whose sibling ``bias`` has the shape of its trailing axes and either rank ≥ 2 (multi-axis
  features, e.g. ``features=(heads, head_dim)``) or sits in a module linen auto-named ``DenseGeneral_<i>``;
- every other rank ≥ 3 ``kernel``: a convolution ``(*spatial, in, out)``, one ``(in, out)`` matrix per
  spatial position, their eigenvalues pooled.

A rank-3 ``kernel`` that none of these identify (a bias-free ``DenseGeneral`` contracting several axes,
named by the user, outside an attention module) is read as a convolution: the leaf alone cannot tell them apart.

Convention: WeightWatcher's (``WWLayer.set_weight_matrices`` in weightwatcher 0.7.5): dense, ``Conv1D``
(Hugging Face's, a dense layer) and embedding layers are one matrix; a ``Conv2D`` is one matrix per
kernel position (``conv2D_Wmats``). WeightWatcher reads PyTorch models, whose attention projections are
``nn.Linear`` weights ``(heads·head_dim, in)`` and ``(out, heads·head_dim)``; Flax's ``DenseGeneral`` only
splits ``heads·head_dim`` into two axes, so merging them back gives WeightWatcher's matrices.

Normalisation: :math:`λ_i = σ_i^2 / N` with :math:`σ_i` the singular values of each matrix and
:math:`N = \max(\text{rows}, \text{cols})`, WeightWatcher's ``normalize=True`` and Martin & Mahoney's
:math:`X`. Each matrix contributes :math:`\min(\text{rows}, \text{cols})` eigenvalues (the zeros of
:math:`W^⊤W` beyond its rank are dropped). α does not depend on this choice; the norms do.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Any, NamedTuple

import jax
import numpy as np
from jaxtyping import ArrayLike, Float, PyTree, Real

__all__ = [
    "LayerSpectrum",
    "PowerLawFit",
    "WeightLayer",
    "WeightSpectra",
    "fit_power_law",
    "layer_eigenvalues",
    "weight_layers",
    "weight_spectra",
]

_ATTENTION_PROJECTIONS = ("query", "key", "value", "out")
_METRICS = (
    "alpha",
    "alpha_weighted",
    "log10_spectral_norm",
    "log10_frobenius_norm",
    "stable_rank",
    "matrix_entropy",
)


@dataclasses.dataclass(frozen=True)
class PowerLawFit:
    r"""Continuous power law :math:`p(λ) = \frac{α-1}{λ_{\min}} (λ/λ_{\min})^{-α}` fitted to a tail."""

    alpha: float
    alpha_stderr: float
    xmin: float
    ks_distance: float
    num_tail: int


_NO_FIT = PowerLawFit(math.nan, math.nan, math.nan, math.nan, 0)


class WeightLayer(NamedTuple):
    """One layer as analysed: ``kind`` (``"dense"``, ``"dense_general"``, ``"conv"`` or ``"embedding"``),
    the pytree ``path`` of its leaf, and its ``matrices``, shape ``(num_matrices, rows, cols)`` (one
    matrix, or one per spatial position of a convolution)."""

    kind: str
    path: str
    matrices: Float[np.ndarray, "num_matrices rows cols"]


@dataclasses.dataclass(frozen=True)
class LayerSpectrum:
    """Weight-spectrum metrics of one layer (see :func:`weight_spectra` for the definitions).

    ``matrix_shape`` is the ``(rows, cols)`` of each of the ``num_matrices`` matrices analysed. A layer
    without a power-law fit has ``power_law.alpha`` and ``alpha_weighted`` NaN, its norms all the same.
    """

    kind: str
    matrix_shape: tuple[int, int]
    num_matrices: int
    num_eigenvalues: int
    power_law: PowerLawFit
    alpha_weighted: float
    log10_spectral_norm: float
    log10_frobenius_norm: float
    stable_rank: float
    matrix_entropy: float

    def scalars(self) -> dict[str, float]:
        """``alpha``, ``alpha_weighted``, ``log10_spectral_norm``, ``log10_frobenius_norm``,
        ``stable_rank``, ``matrix_entropy``."""
        return {
            "alpha": self.power_law.alpha,
            "alpha_weighted": self.alpha_weighted,
            "log10_spectral_norm": self.log10_spectral_norm,
            "log10_frobenius_norm": self.log10_frobenius_norm,
            "stable_rank": self.stable_rank,
            "matrix_entropy": self.matrix_entropy,
        }


@dataclasses.dataclass(frozen=True)
class WeightSpectra:
    """Metrics of every layer, keyed by layer name (see :func:`weight_layers`);
    ``skipped``: the layers left out of the power-law fit and of ``summary``, with the reason (those with
    finite, non-zero weights are still in ``layers``, with NaN α); ``summary``: the mean of each metric
    over the fitted layers (empty when none is)."""

    layers: dict[str, LayerSpectrum]
    skipped: dict[str, str]
    summary: dict[str, float]

    def per_layer_scalars(self) -> dict[str, float]:
        """``{"<layer>/<metric>": value}`` for every layer and each metric of :meth:`LayerSpectrum.scalars`,
        ``alpha`` and ``alpha_weighted`` NaN for a layer without a fit (so a layer keeps its names from
        one call to the next). Prefix them for logging, e.g. ``weights/Dense_0/alpha``."""
        return {
            f"{name}/{metric}": value
            for name, layer in self.layers.items()
            for metric, value in layer.scalars().items()
        }


def weight_spectra(params: PyTree, *, min_eigenvalues: int = 10) -> WeightSpectra:
    r"""Weight-spectrum metrics of every layer of ``params`` (the layers of :func:`weight_layers`).

    With the pooled eigenvalues :math:`λ_1 ≥ … ≥ λ_M` of a layer (module doc):

    .. math::
       \hat α = α \log_{10} λ_1, \quad \log_{10} \|W\|_2^2/N = \log_{10} λ_1, \quad
       \log_{10} \|W\|_F^2/N = \log_{10} \textstyle\sum_i λ_i, \quad
       r_s = \frac{\|W\|_F^2}{\|W\|_2^2} = \frac{\sum_i λ_i}{λ_1}, \quad
       H = \frac{-\sum_i p_i \ln p_i}{\ln R}, \; p_i = \frac{λ_i}{\sum_j λ_j}

    with α from :func:`fit_power_law`, ``R`` the number of non-zero eigenvalues (``H`` is NaN for
    ``R = 1``), and WeightWatcher's conventions: the "spectral norm" and "Frobenius norm" are those
    of the eigenvalues, i.e. squared norms of :math:`W / \sqrt N`. Layers with fewer than
    ``min_eigenvalues`` non-zero eigenvalues (WeightWatcher's default: 10) get no power-law fit (α and
    :math:`\hat α` NaN, the other metrics as defined); layers with non-finite or all-zero weights are
    skipped altogether. Both are listed in ``skipped`` and left out of ``summary``.

    Example::

        spectra = weight_spectra(model.params)
        spectra.summary["alpha"]                            # mean α over the fitted layers
        spectra.per_layer_scalars()["Dense_0/alpha"]        # one layer's α

    Reference: Martin & Mahoney, "Traditional and heavy-tailed self regularization in neural network
    models", arXiv 1901.08278; Martin, Peng & Mahoney, Nat. Commun. 12 (2021) (α̂ and the norms).
    """
    layers, skipped = {}, {}
    for name, layer in weight_layers(params).items():
        if not np.all(np.isfinite(layer.matrices)):
            skipped[name] = "non-finite weights (NaN or inf)"
            continue
        eigenvalues = layer_eigenvalues(layer.matrices)
        nonzero = eigenvalues[eigenvalues > eigenvalues[0] * eigenvalues.size * np.finfo(np.float64).eps]
        if nonzero.size == 0:
            skipped[name] = "all weights are zero"
            continue
        fit = _NO_FIT
        if nonzero.size < min_eigenvalues:
            skipped[name] = f"{nonzero.size} non-zero eigenvalues < min_eigenvalues={min_eigenvalues}: no fit"
        else:
            fit = fit_power_law(nonzero)
            if not np.isfinite(fit.alpha):
                skipped[name] = "power-law fit failed: fewer than two distinct eigenvalues"
        layers[name] = _layer_spectrum(layer, eigenvalues.size, nonzero, fit)
    return WeightSpectra(layers, skipped, _summary([s for n, s in layers.items() if n not in skipped]))


def weight_layers(params: PyTree) -> dict[str, WeightLayer]:
    """The layers of ``params`` and the matrices analysed for each (rules in the module doc), in pytree order.

    A layer's name is the ``/``-joined path of its module (``Dense_0``, ``encoder/attn/query``): the
    leaf's path without its final ``kernel``/``embedding`` (nor NNX's trailing ``.value``). A module
    with several layer leaves, or the root, keeps the leaf name (``kernel``). Characters other than
    letters, digits, ``_``, ``.`` and ``-`` become ``_`` and an empty part ``_``, so names are valid
    TensorBoard tags and HDF5 paths.
    """
    leaves = {tuple(_key_names(path)): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    found = []
    for names, leaf in leaves.items():
        layer = _weight_layer(names, leaf, leaves)
        if layer is not None:
            found.append((names, layer))
    layers_per_module = collections.Counter(names[:-1] for names, _ in found)
    return {
        _layer_name(names if not names[:-1] or layers_per_module[names[:-1]] > 1 else names[:-1]): layer
        for names, layer in found
    }


def layer_eigenvalues(matrices: Real[ArrayLike, "*batch rows cols"]) -> Float[np.ndarray, " m"]:
    r"""Pooled eigenvalues :math:`σ^2 / \max(\text{rows}, \text{cols})` of ``(*batch, rows, cols)`` matrices.

    Descending, ``prod(batch) · min(rows, cols)`` of them: a convolution kernel ``(*spatial, in, out)``
    gives one ``(in, out)`` slice per position; a :class:`WeightLayer`'s ``matrices`` are already stacked.
    """
    matrices = np.asarray(matrices, dtype=np.float64)
    if matrices.ndim < 2:
        raise ValueError(f"matrices must have ndim >= 2 (*batch, rows, cols); got shape {matrices.shape}.")
    slices = matrices.reshape(-1, *matrices.shape[-2:])
    singular_values = np.linalg.svd(slices, compute_uv=False).ravel()
    return np.sort(singular_values**2 / max(matrices.shape[-2:]))[::-1]


def fit_power_law(eigenvalues: Float[ArrayLike, " m"]) -> PowerLawFit:
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


def _weight_layer(names: tuple[str, ...], leaf: Any, leaves: dict[tuple[str, ...], Any]) -> WeightLayer | None:
    leaf_name, module, shape = (names[-1] if names else ""), names[:-1], np.shape(leaf)
    path = "/".join(names)
    if leaf_name == "embedding" and len(shape) == 2:
        return WeightLayer("embedding", path, np.asarray(leaf)[None])
    if leaf_name != "kernel" or len(shape) < 2:
        return None
    if len(shape) == 2:
        return WeightLayer("dense", path, np.asarray(leaf)[None])
    num_in = _dense_general_input_axes(module, shape, leaves)
    if num_in is not None:
        rows = math.prod(shape[:num_in])
        return WeightLayer("dense_general", path, np.asarray(leaf).reshape(1, rows, -1))
    return WeightLayer("conv", path, np.asarray(leaf).reshape(-1, *shape[-2:]))


def _dense_general_input_axes(module: tuple[str, ...], shape: tuple[int, ...], leaves: dict) -> int | None:
    """Number of leading input axes of a rank ≥ 3 DenseGeneral kernel, or None for a convolution."""
    if (
        module
        and module[-1] in _ATTENTION_PROJECTIONS
        and all((*module[:-1], projection, "kernel") in leaves for projection in _ATTENTION_PROJECTIONS)
    ):
        return len(shape) - 1 if module[-1] == "out" else 1
    bias = leaves.get((*module, "bias"))
    bias_shape = () if bias is None else np.shape(bias)
    if (
        0 < len(bias_shape) < len(shape)
        and tuple(shape[-len(bias_shape) :]) == bias_shape
        and (len(bias_shape) >= 2 or (module and re.fullmatch(r"DenseGeneral_\d+", module[-1])))
    ):
        return len(shape) - len(bias_shape)
    return None


def _layer_spectrum(layer: WeightLayer, num_eigenvalues: int, nonzero: np.ndarray, fit: PowerLawFit) -> LayerSpectrum:
    largest, total = nonzero[0], nonzero.sum()
    p = nonzero / total
    entropy = -np.sum(p * np.log(p)) / np.log(nonzero.size) if nonzero.size > 1 else math.nan
    num_matrices, rows, cols = layer.matrices.shape
    return LayerSpectrum(
        kind=layer.kind,
        matrix_shape=(rows, cols),
        num_matrices=num_matrices,
        num_eigenvalues=num_eigenvalues,
        power_law=fit,
        alpha_weighted=fit.alpha * math.log10(largest),
        log10_spectral_norm=math.log10(largest),
        log10_frobenius_norm=math.log10(total),
        stable_rank=float(total / largest),
        matrix_entropy=float(entropy),
    )


def _summary(fitted: list[LayerSpectrum]) -> dict[str, float]:
    if not fitted:
        return {}
    return {metric: float(np.mean([layer.scalars()[metric] for layer in fitted])) for metric in _METRICS}


def _key_names(path: tuple) -> list[str]:
    # NNX's State ends each path in the Variable's ``.value`` attribute; a dict key named "value" is kept.
    while path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        path = path[:-1]
    return [_key_name(key) for key in path]


def _key_name(key: Any) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def _layer_name(names: tuple[str, ...]) -> str:
    return "/".join(re.sub(r"[^A-Za-z0-9_.\-]", "_", name) or "_" for name in names)
