"""ntkcv: empirical neural tangent kernels and their collective variables for JAX/Flax models."""

from ntkcv.models import Model, from_function, from_linen, from_nnx
from ntkcv.ntk import Implementation, NTKOperator, flatten_kernel, ntk_fn, ntk_operator

__version__ = "0.1.0"

__all__ = [
    "Implementation",
    "Model",
    "NTKOperator",
    "flatten_kernel",
    "from_function",
    "from_linen",
    "from_nnx",
    "ntk_fn",
    "ntk_operator",
]
