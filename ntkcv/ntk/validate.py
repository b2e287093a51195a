"""Checks on user input shared by the kernel factory and the operator; errors name the problem."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def check_params(params: Any) -> int:
    """Every leaf must be a floating-point array; returns the number of parameters ``P``."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    if not leaves:
        raise ValueError(
            "params has no array leaves: the model has no trainable parameters to differentiate "
            f"(got {type(params).__name__})"
        )
    count = 0
    for path, leaf in leaves:
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.inexact):
            raise TypeError(
                f"params leaf {jax.tree_util.keystr(path)} must be a floating-point array, "
                f"got {type(leaf).__name__} with dtype {dtype}"
            )
        count += leaf.size
    if count == 0:
        raise ValueError("params has only empty arrays: the model has no trainable parameters")
    return count


def check_inputs(x1: jax.Array, x2: jax.Array | None = None) -> None:
    """Inputs are arrays with a batch axis and, for two sets, the same feature shape and dtype kind."""
    for name, x in (("x1", x1), ("x2", x2)):
        if x is None:
            continue
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{name} must be an array of shape (N, ...), got {type(x).__name__}")
        if len(x.shape) == 0 or x.shape[0] == 0:
            raise ValueError(f"{name} must have a non-empty batch axis first, got shape {tuple(x.shape)}")
    if x2 is not None and tuple(x1.shape[1:]) != tuple(x2.shape[1:]):
        raise ValueError(
            f"x1 and x2 must have the same feature shape, got x1 {tuple(x1.shape)} and x2 {tuple(x2.shape)}"
        )
