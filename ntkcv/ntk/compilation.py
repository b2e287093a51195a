"""XLA compile options for ntkcv's programs: for the ones compiled while a training run waits (the monitor's program
and the model profile behind the NTK's cost model) options that compile faster, and for every program that computes
an NTK options that run it faster on CPU.

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

#: Added for a compile in the background of a training loop: code generation on one thread (one LLVM module), so
#: the compile leaves the other cores to the loop, which is compiling its own step at the same moment. The compile
#: itself takes longer in wall time and less in CPU time (``python -m benchmarks.monitor_compile``).
BACKGROUND_CPU_OPTIONS: dict[str, Any] = {"xla_cpu_parallel_codegen_split_count": 1}


#: XLA's CPU YNNPACK fusions (``xla_cpu_experimental_ynn_fusion_type``, on by default in jaxlib 0.10) run the NTK's
#: skinny products (64 × 64 results, millions deep) at half the speed of XLA's own dot, and 25 times slower when a
#: fusion joins one to a reduction: the contraction of ResNet-18's last layers took 20.9 s with them and 1.4 s
#: without (``benchmarks/NOTES.md``, "Structured path at ResNet-18 scale"). An empty list enables none.
NTK_CPU_OPTIONS: dict[str, Any] = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.cache
def _cpu_accepts(options: tuple[tuple[str, Any], ...]) -> bool:
    """Whether this XLA knows all ``options`` (an unknown option fails every compile that names it)."""
    try:
        one = jax.device_put(np.float32(1), jax.local_devices(backend="cpu")[0])
        jax.jit(lambda a: a + 1).lower(one).compile(compiler_options=dict(options))
    except Exception as error:  # a newer XLA without one of them: compile as usual
        logger.debug("XLA does not accept %s (%s); compiling with its defaults", dict(options), error)
        return False
    return True


def quick_compile_options(backend: str | None = None, *, background: bool = False) -> dict[str, Any]:
    """Compile options for ``backend`` (default: JAX's default backend) that shorten compilation without slowing
    the program: :data:`QUICK_CPU_OPTIONS` on CPU, with :data:`BACKGROUND_CPU_OPTIONS` for a compile that runs
    beside a training loop (``background``), when this XLA accepts them; otherwise none."""
    return _on_cpu({**QUICK_CPU_OPTIONS, **(BACKGROUND_CPU_OPTIONS if background else {})}, backend)


def ntk_compile_options(backend: str | None = None) -> dict[str, Any]:
    """Compile options for a program that computes an NTK on ``backend`` (default: JAX's default backend):
    :data:`NTK_CPU_OPTIONS` on CPU when this XLA accepts them; otherwise none. They apply to the jitted function they
    are given to, never to the process; inside another ``jit`` the outer function's options rule."""
    return _on_cpu(NTK_CPU_OPTIONS, backend)


def _on_cpu(options: dict[str, Any], backend: str | None) -> dict[str, Any]:
    """``options`` when ``backend`` (default: JAX's default backend) is the CPU and this XLA accepts them; else none."""
    backend = backend or jax.default_backend()
    return dict(options) if backend == "cpu" and _cpu_accepts(tuple(sorted(options.items()))) else {}
