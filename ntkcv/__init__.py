"""ntkcv: empirical neural tangent kernels and their collective variables for JAX/Flax models."""

import importlib.metadata

from ntkcv import cv
from ntkcv import layers as _layers  # noqa: F401  registers Flax layer recognition for the structured NTK
from ntkcv.cv import collective_variables
from ntkcv.measurement import Context, Measurement, make_measurement
from ntkcv.models import Model, from_function, from_linen, from_nnx
from ntkcv.monitor import NTKMonitor
from ntkcv.ntk import Implementation, NTKOperator, flatten_kernel, ntk_fn, ntk_operator, parameter_groups
from ntkcv.recorder import Recorder
from ntkcv.schedule import Schedule

__version__ = importlib.metadata.version("ntkcv")  # one source of truth: pyproject.toml

__all__ = [
    "Context",
    "Implementation",
    "Measurement",
    "Model",
    "NTKMonitor",
    "NTKOperator",
    "Recorder",
    "Schedule",
    "collective_variables",
    "cv",
    "flatten_kernel",
    "from_function",
    "from_linen",
    "from_nnx",
    "make_measurement",
    "ntk_fn",
    "ntk_operator",
    "parameter_groups",
]
