"""ntkcv: empirical neural tangent kernels and their collective variables for JAX/Flax models."""

import importlib.metadata

from ntkcv import cv
from ntkcv.cv import collective_variables
from ntkcv.models import Model, from_function, from_linen, from_nnx
from ntkcv.monitor import NTKMonitor
from ntkcv.ntk import Implementation, NTKOperator, flatten_kernel, ntk_fn, ntk_operator
from ntkcv.schedule import Schedule

__version__ = importlib.metadata.version("ntkcv")  # one source of truth: pyproject.toml

__all__ = [
    "Implementation",
    "Model",
    "NTKMonitor",
    "NTKOperator",
    "Schedule",
    "collective_variables",
    "cv",
    "flatten_kernel",
    "from_function",
    "from_linen",
    "from_nnx",
    "ntk_fn",
    "ntk_operator",
]
