"""Model adapters: turn a plain function, a ``flax.linen`` module, a ``flax.nnx`` module or an ``equinox`` module
into ``Model(apply_fn, params)`` with ``apply_fn(params, x) -> outputs``.

Only ``params`` is differentiated: linen collections other than ``params`` (``batch_stats``, …), NNX
state that is not an ``nnx.Param`` and the leaves of an equinox module that are not inexact arrays are closed over
and held fixed. With :mod:`ntkcv.layers` (which layer calls the structured NTK factorises), the only modules of the
NTK pipeline that import flax or equinox.

Example (linen)::

    import flax.linen as nn, jax, jax.numpy as jnp, ntkcv

    module = nn.Sequential([nn.Dense(64), nn.tanh, nn.Dense(10)])
    x = jnp.ones((8, 784))
    model = ntkcv.from_linen(module, module.init(jax.random.key(0), x))
    K = ntkcv.ntk_fn(model.apply_fn)(model.params, x)          # (8, 8)

Example (NNX)::

    from flax import nnx

    model = ntkcv.from_nnx(nnx.Linear(784, 10, rngs=nnx.Rngs(0)))
    K = ntkcv.ntk_fn(model.apply_fn)(model.params, x)

Example (equinox; the module takes one sample, ``apply_fn`` maps it over the batch)::

    import equinox as eqx

    model = ntkcv.from_equinox(eqx.nn.MLP(784, 10, width_size=64, depth=1, activation=jnp.tanh,
                                          key=jax.random.key(0)))
    K = ntkcv.ntk_fn(model.apply_fn)(model.params, x)
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import PyTree

from ntkcv.ntk.layout import ApplyFn

# Called by ``from_nnx``'s ``apply_fn`` with the freshly merged module just before it is applied, when set.
# Lets the structured NTK's layer recognition (``ntkcv.layers``) observe or wrap the module's layers inside a
# traced ``apply_fn``; ``None`` (the default) leaves the call untouched.
nnx_module_hook: contextvars.ContextVar[Callable[[Any], None] | None] = contextvars.ContextVar(
    "ntkcv_nnx_module_hook", default=None
)
# Called by ``from_equinox``'s ``apply_fn`` with the recombined module, which it replaces by the hook's result (the
# same module with its layers tapped by ``ntkcv.layers``); ``None`` (the default) applies the module as it is.
equinox_module_hook: contextvars.ContextVar[Callable[[Any], Any] | None] = contextvars.ContextVar(
    "ntkcv_equinox_module_hook", default=None
)


class Model(NamedTuple):
    """A model as the NTK sees it: ``apply_fn(params, x)`` and the ``params`` to differentiate."""

    apply_fn: ApplyFn
    params: PyTree


def from_function(apply_fn: ApplyFn, params: PyTree) -> Model:
    """A plain function ``apply_fn(params, x)``; every array leaf of ``params`` is differentiated."""
    if not callable(apply_fn):
        raise TypeError(f"apply_fn must be callable, got {type(apply_fn).__name__}")
    return Model(apply_fn, params)


def from_linen(module: Any, variables: PyTree, *, method: str | Callable | None = None, **apply_kwargs: Any) -> Model:
    """A ``flax.linen.Module`` with its variables.

    ``variables['params']`` is differentiated; every other collection (``batch_stats``, …) is held
    fixed, and the module is applied with ``mutable=False`` (so BatchNorm must be in eval mode, e.g.
    ``use_running_average=True`` passed through ``apply_kwargs``).
    """
    import flax.linen as nn

    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a flax.linen.Module, got {type(module).__name__}")
    if not hasattr(variables, "keys") or "params" not in variables:
        got = list(variables.keys()) if hasattr(variables, "keys") else type(variables).__name__
        raise ValueError(f"variables must be a mapping with a 'params' collection, got {got}")
    fixed = {name: value for name, value in variables.items() if name != "params"}

    def apply_fn(params, x):
        return module.apply({"params": params, **fixed}, x, method=method, **apply_kwargs)

    return Model(apply_fn, variables["params"])


def from_nnx(module: Any) -> Model:
    """A ``flax.nnx.Module``: its ``nnx.Param`` state is differentiated, all other state held fixed.

    ``apply_fn(params, x)`` merges the parameters back into a copy of the module and calls it on ``x``;
    put the module in eval mode first (``module.eval()``) if it has dropout or BatchNorm.
    """
    from flax import nnx

    if not isinstance(module, nnx.Module):
        raise TypeError(f"module must be a flax.nnx.Module, got {type(module).__name__}")
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def apply_fn(params, x):
        merged = nnx.merge(graphdef, params, rest)
        hook = nnx_module_hook.get()
        if hook is not None:
            hook(merged)
        return merged(x)

    return Model(apply_fn, params)


def from_equinox(module: Any, *, batched: bool = False) -> Model:
    """An ``equinox.Module``: its inexact-array leaves are differentiated, every other leaf (activation functions,
    integers, integer arrays) held fixed: ``params, static = eqx.partition(module, eqx.is_inexact_array)``.

    equinox modules take one sample, so ``apply_fn(params, x)`` recombines the module and maps it over the batch
    axis of ``x`` with ``jax.vmap`` (a batch of one sample is applied directly: how the NTK's per-sample passes see
    the layers the structured path factorises). ``batched=True``: the module takes the whole batch itself. Put a
    module with dropout in inference mode first (``eqx.nn.inference_mode(module)``).
    """
    try:
        import equinox as eqx
    except ImportError as error:
        raise ImportError("from_equinox needs equinox: pip install 'ntkcv[equinox]'") from error

    if not isinstance(module, eqx.Module):
        raise TypeError(f"module must be an equinox.Module, got {type(module).__name__}")
    params, static = eqx.partition(module, eqx.is_inexact_array)

    def apply_fn(params, x):
        combined = eqx.combine(params, static)
        hook = equinox_module_hook.get()
        if hook is not None:
            combined = hook(combined)
        if batched:
            return combined(x)
        if x.shape[0] == 1:
            return jax.tree_util.tree_map(lambda y: jnp.expand_dims(y, 0), combined(x[0]))
        return jax.vmap(combined)(x)

    return Model(apply_fn, params)
