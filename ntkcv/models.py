"""Model adapters: turn a plain function, a ``flax.linen`` module or a ``flax.nnx`` module into
``Model(apply_fn, params)`` with ``apply_fn(params, x) -> outputs``.

Only ``params`` is differentiated: linen collections other than ``params`` (``batch_stats``, …) and NNX
state that is not an ``nnx.Param`` are closed over and held fixed. This is the only module of the NTK
pipeline that imports flax.

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
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax

ApplyFn = Callable[[Any, jax.Array], Any]

# Called by ``from_nnx``'s ``apply_fn`` with the freshly merged module just before it is applied, when set.
# Lets an NTK implementation observe or wrap the module's layers inside a traced ``apply_fn`` (see
# ``ntkcv.ntk.structured``); ``None`` (the default) leaves the call untouched.
nnx_module_hook: contextvars.ContextVar[Callable[[Any], None] | None] = contextvars.ContextVar(
    "ntkcv_nnx_module_hook", default=None
)


class Model(NamedTuple):
    """A model as the NTK sees it: ``apply_fn(params, x)`` and the ``params`` to differentiate."""

    apply_fn: ApplyFn
    params: Any


def from_function(apply_fn: ApplyFn, params: Any) -> Model:
    """A plain function ``apply_fn(params, x)``; every array leaf of ``params`` is differentiated."""
    if not callable(apply_fn):
        raise TypeError(f"apply_fn must be callable, got {type(apply_fn).__name__}")
    return Model(apply_fn, params)


def from_linen(module: Any, variables: Any, *, method: str | Callable | None = None, **apply_kwargs: Any) -> Model:
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


# Layer recognition for the structured NTK (ntkcv.ntk.structured): which Flax layers it factorises, read
# from a traced call. linen layers are seen through ``nn.intercept_methods``; NNX layers of a module that
# ``from_nnx``'s apply_fn merged, through ``nnx_module_hook``. ``recording(recorder)`` activates both;
# the recorder's ``visit(key, method, describe, args, kwargs, call)`` decides what happens to each call.



class LayerCall(NamedTuple):
    """A supported layer call, as seen in one traced call (``params`` maps roles to the arrays read)."""

    kind: str  # "dense", "conv" or "embed"
    config: tuple  # dense: (contracting axes, number of feature axes); conv: see _patches
    params: dict


def _param_values_linen(module, roles):
    values = module.variables.get("params", {})
    if set(values) != set(roles):
        return f"has parameters {sorted(values)}, expected {sorted(roles)}"
    return {role: values[role] for role in roles}


def _param_values_nnx(module, roles):
    from flax import nnx

    params = jax.tree_util.tree_leaves(nnx.state(module, nnx.Param))
    found = {role: getattr(module, role, None) for role in roles}
    if len(params) != len(roles) or not all(isinstance(v, nnx.Param) for v in found.values()):
        return f"has {len(params)} parameters, expected {sorted(roles)}"
    return {role: value.get_value() for role, value in found.items()}


def _axes(axis, ndim):
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(sorted(a % ndim for a in axes))


def _conv_padding(padding, rank):
    if isinstance(padding, str):
        return padding.upper()
    if isinstance(padding, int):
        return ((padding, padding),) * rank
    pads = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
    return pads * rank if len(pads) == 1 else pads


def _broadcast(value, rank):
    value = 1 if value is None else value
    return (value,) * rank if isinstance(value, int) else tuple(value)


def _layer_classes(nnx_module: bool) -> tuple[type, type, type, type]:
    """The dense, general dense, convolution and embedding classes of ``flax.nnx`` or ``flax.linen``
    (imported only for the framework in use: importing ``flax.nnx`` costs 0.3 s)."""
    if nnx_module:
        from flax import nnx

        return nnx.Linear, nnx.LinearGeneral, nnx.Conv, nnx.Embed
    import flax.linen as nn

    return nn.Dense, nn.DenseGeneral, nn.Conv, nn.Embed


def _describe_call(module, cls: type, method: str, args: tuple, kwargs: dict, *,
                   nnx_module: bool) -> LayerCall | str:
    """A supported call of a supported layer, or the reason why it is not one."""
    dense, dense_general, conv, embed = _layer_classes(nnx_module)
    extra = {k: v for k, v in kwargs.items() if v is not None and k != "inputs"}
    if method != "__call__" or extra or len(args) + ("inputs" in kwargs) != 1:
        return f"method {method} called with {len(args)} positional and keyword arguments {sorted(kwargs)}"
    inputs = args[0] if args else kwargs["inputs"]
    param_values = _param_values_nnx if nnx_module else _param_values_linen
    use_bias = getattr(module, "use_bias", False)
    dense_roles = ("kernel", "bias") if use_bias else ("kernel",)
    default_dot = getattr(module, "dot_general", None) in (None, jax.lax.dot_general)
    if not default_dot or getattr(module, "dot_general_cls", None) is not None:
        return "uses a custom dot_general"
    if cls is dense:
        kind, config, roles = "dense", ((inputs.ndim - 1,), 1), dense_roles
    elif cls is dense_general:
        if getattr(module, "batch_dims", ()) or getattr(module, "batch_axis", {}):
            return "has batch axes"
        features = module.out_features if nnx_module else module.features
        n_features = 1 if isinstance(features, int) else len(features)
        kind, config, roles = "dense", (_axes(module.axis, inputs.ndim), n_features), dense_roles
    elif cls is conv:
        if module.feature_group_count != 1 or module.mask is not None:
            return "is grouped or masked"
        if getattr(module, "conv_general_dilated_cls", None) is not None or getattr(
            module, "conv_general_dilated", None
        ) not in (None, jax.lax.conv_general_dilated):
            return "uses a custom convolution"
        rank = len(module.kernel_size)
        config = (
            tuple(module.kernel_size),
            _broadcast(module.strides, rank),
            _conv_padding(module.padding, rank),
            _broadcast(module.input_dilation, rank),
            _broadcast(module.kernel_dilation, rank),
        )
        kind, roles = "conv", dense_roles
    elif cls is embed:
        kind, config, roles = "embed", (), ("embedding",)
    else:
        return f"{cls.__name__} has no structured rule"
    values = param_values(module, roles)
    if isinstance(values, str):
        return values
    return LayerCall(kind, config, values)



_RECORDER: contextvars.ContextVar = contextvars.ContextVar("ntkcv_structured_recorder", default=None)


def _linen_interceptor(next_fun, args, kwargs, context):
    recorder = _RECORDER.get()
    module = context.module
    if recorder is None or type(module) not in _layer_classes(False) or context.method_name == "setup":
        return next_fun(*args, **kwargs)
    key = "/".join(("linen",) + tuple(module.path))
    describe = functools.partial(_describe_call, module, type(module), context.method_name, args, kwargs,
                                 nnx_module=False)
    return recorder.visit(key, context.method_name, describe, args, kwargs, lambda: next_fun(*args, **kwargs))


@functools.cache
def _tapped_nnx_class(cls: type) -> type:
    """A subclass of an NNX layer class whose calls go through the active recorder."""

    def wrap(name):
        original = getattr(cls, name)

        def method(self, *args, **kwargs):
            recorder = _RECORDER.get()
            key = None if recorder is None else recorder.nnx_keys.get(id(self))
            if key is None:
                return original(self, *args, **kwargs)
            describe = functools.partial(_describe_call, self, cls, name, args, kwargs, nnx_module=True)
            return recorder.visit(key, name, describe, args, kwargs, lambda: original(self, *args, **kwargs))

        return method

    methods = {name: wrap(name) for name in ("__call__", "attend") if hasattr(cls, name)}
    return type(cls.__name__, (cls,), methods)


def _nnx_hook(module) -> None:
    from flax import nnx

    recorder = _RECORDER.get()
    if recorder is None:
        return
    for path, node in nnx.iter_graph(module):
        if type(node) in _layer_classes(True):
            recorder.nnx_keys[id(node)] = "/".join(("nnx",) + tuple(str(p) for p in path))
            object.__setattr__(node, "__class__", _tapped_nnx_class(type(node)))


@contextlib.contextmanager
def recording(recorder):
    token = _RECORDER.set(recorder)
    hook_token = nnx_module_hook.set(_nnx_hook)
    try:
        with contextlib.ExitStack() as stack:
            try:
                import flax.linen as nn
            except ImportError:  # no flax: plain functions only, everything falls back
                pass
            else:
                stack.enter_context(nn.intercept_methods(_linen_interceptor))
            yield recorder
    finally:
        nnx_module_hook.reset(hook_token)
        _RECORDER.reset(token)
