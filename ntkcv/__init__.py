"""ntkcv: empirical neural tangent kernels and their collective variables for JAX/Flax models."""

import importlib.metadata

from ntkcv import curvature, cv, infinite, predict
from ntkcv import layers as _layers  # noqa: F401  registers Flax and equinox layer recognition for the structured NTK
from ntkcv.cv import collective_variables
from ntkcv.infinite import infinite_width_nngp, infinite_width_ntk
from ntkcv.measurement import Context, Measurement, make_measurement
from ntkcv.models import Model, from_equinox, from_function, from_linen, from_nnx
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
    "curvature",
    "cv",
    "flatten_kernel",
    "from_equinox",
    "from_function",
    "from_linen",
    "from_nnx",
    "infinite",
    "infinite_width_nngp",
    "infinite_width_ntk",
    "make_measurement",
    "ntk_fn",
    "ntk_operator",
    "parameter_groups",
    "predict",
]
