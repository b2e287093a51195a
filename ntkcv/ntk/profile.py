"""Static sizes of a model that the cost and memory models of the implementations read."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from ntkcv.ntk.compilation import quick_compile_options

logger = logging.getLogger("ntkcv.ntk")


class ModelProfile(NamedTuple):
    """Sizes per sample: outputs kept ``O`` and traced ``R``, parameters ``P``, forward cost and memory."""

    kept: int
    traced: int
    num_params: int
    itemsize: int
    forward_flops: float  # one sample
    activation_bytes: int  # one sample, forward pass


def profile_model(f: Callable, params: Any, x: jax.Array, kept: int, traced: int, num_params: int) -> ModelProfile:
    """Measure one sample's forward FLOPs and temporary memory from XLA's compiled cost analysis.

    Falls back to ``2·P`` FLOPs and ``R·O`` outputs' worth of activations when the backend gives no
    analysis.
    """
    itemsize = max(leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(params))
    abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (params, x[:1]))
    flops, activations = 2.0 * num_params, kept * traced * itemsize
    try:
        # neither LLVM's optimisation level nor the fusion emitters change the analyses (both read the optimised
        # HLO): compiled faster at level 0 with the quick options
        options = {**quick_compile_options(), "xla_backend_optimization_level": 0}
        compiled = jax.jit(f).lower(*abstract).compile(compiler_options=options)
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops = max(float(cost.get("flops", flops)), flops)
        memory = compiled.memory_analysis()
        if memory is not None:
            activations = max(int(memory.temp_size_in_bytes) + int(memory.output_size_in_bytes), activations)
    except Exception as error:  # the analysis is an optimisation hint, never a reason to fail
        logger.debug("cost analysis unavailable (%s); using 2·P FLOPs per sample", error)
    return ModelProfile(kept, traced, num_params, itemsize, flops, activations)
