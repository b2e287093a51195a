"""Collective variables of an NTK: pure, ``jit``-able functions from a kernel to scalars or arrays.

Dense CVs take a :data:`Kernel` (``(N, N)``, ``(N·K, N·K)`` or ``(N, N, K, K)``); :func:`collective_variables`
computes any set of them in one pass. The estimators take a matrix-vector product instead, and
:func:`weight_spectra` needs only the parameters.
"""

from ntkcv.cv._kernel import Kernel
from ntkcv.cv.alignment import centred_target_alignment, cross_target_alignment, target_alignment, target_kernel
from ntkcv.cv.classwise import classwise_entropy, classwise_trace
from ntkcv.cv.collect import AVAILABLE, collective_variables
from ntkcv.cv.drift import cosine_distance, kernel_velocity, relative_distance, subspace_overlap
from ntkcv.cv.estimators import (
    Estimate,
    entropy_slq,
    top_eigenvalues_lanczos,
    trace_hutchinson,
    trace_hutchpp,
)
from ntkcv.cv.normalised import (
    cosine_entropy,
    cosine_kernel,
    magnitude_distribution,
    magnitude_entropy,
    magnitude_variance,
)
from ntkcv.cv.spectral import (
    condition_number,
    effective_entropy,
    effective_rank,
    entropy,
    frobenius_norm,
    max_eigenvalue,
    mean_trace,
    negative_mass,
    participation_ratio,
    spectrum,
    top_eigenvalues,
    trace,
)
from ntkcv.cv.weights import (
    LayerSpectrum,
    PowerLawFit,
    WeightLayer,
    WeightSpectra,
    fit_power_law,
    layer_eigenvalues,
    weight_layers,
    weight_spectra,
)

__all__ = [
    "AVAILABLE",
    "Estimate",
    "Kernel",
    "LayerSpectrum",
    "PowerLawFit",
    "WeightLayer",
    "WeightSpectra",
    "centred_target_alignment",
    "classwise_entropy",
    "classwise_trace",
    "collective_variables",
    "condition_number",
    "cosine_distance",
    "cosine_entropy",
    "cosine_kernel",
    "cross_target_alignment",
    "effective_entropy",
    "effective_rank",
    "entropy",
    "entropy_slq",
    "fit_power_law",
    "frobenius_norm",
    "kernel_velocity",
    "layer_eigenvalues",
    "magnitude_distribution",
    "magnitude_entropy",
    "magnitude_variance",
    "max_eigenvalue",
    "mean_trace",
    "negative_mass",
    "participation_ratio",
    "relative_distance",
    "spectrum",
    "subspace_overlap",
    "target_alignment",
    "target_kernel",
    "top_eigenvalues",
    "top_eigenvalues_lanczos",
    "trace",
    "trace_hutchinson",
    "trace_hutchpp",
    "weight_layers",
    "weight_spectra",
]
