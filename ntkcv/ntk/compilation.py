"""XLA compile options for the programs that ntkcv compiles while a training run waits: the monitor's program
and the model profile behind the NTK's cost model.

On CPU, XLA's loop fusion emitters (``xla_cpu_use_fusion_emitters=False``) compile these programs faster than its
default MLIR fusion emitters (the monitor's program for the default MLP: 0.45 → 0.28 CPU-seconds; the CNN: 0.71 →
0.44; the transformer: 1.8 → 1.5), with identical results and the same run time (``python -m
benchmarks.monitor_compile``). A first run of a model pays this compile on the cores its training loop
needs, so the monitor asks for them.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import jax
import numpy as np

logger = logging.getLogger("ntkcv.ntk")

#: Options that make XLA's CPU compiler faster without changing what the program computes or how fast it runs.
QUICK_CPU_OPTIONS: dict[str, Any] = {"xla_cpu_use_fusion_emitters": False}


@functools.cache
def _cpu_accepts_quick_options() -> bool:
    """Whether this XLA knows :data:`QUICK_CPU_OPTIONS` (an unknown option fails every compile that names it)."""
    try:
        one = jax.device_put(np.float32(1), jax.local_devices(backend="cpu")[0])
        jax.jit(lambda a: a + 1).lower(one).compile(compiler_options=QUICK_CPU_OPTIONS)
    except Exception as error:  # a newer XLA without the option: compile as usual
        logger.debug("XLA does not accept %s (%s); compiling with its defaults", QUICK_CPU_OPTIONS, error)
        return False
    return True


def quick_compile_options(backend: str | None = None) -> dict[str, Any]:
    """Compile options for ``backend`` (default: JAX's default backend) that shorten compilation without slowing
    the program: :data:`QUICK_CPU_OPTIONS` on CPU when this XLA accepts them, otherwise none."""
    backend = backend or jax.default_backend()
    return dict(QUICK_CPU_OPTIONS) if backend == "cpu" and _cpu_accepts_quick_options() else {}
