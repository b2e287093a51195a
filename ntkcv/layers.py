"""Layer recognition for the structured NTK: which ``flax.linen``, ``flax.nnx`` and ``equinox`` layer calls it
factorises.

Implements :mod:`ntkcv.ntk.interception`'s protocol and registers :func:`framework_layers` when imported (``import
ntkcv`` does). linen layers are seen through ``flax.linen.intercept_methods`` (any ``apply_fn`` that applies a
linen module); NNX and equinox layers through :data:`ntkcv.models.nnx_module_hook` and
:data:`ntkcv.models.equinox_module_hook`, which the ``apply_fn`` of ``from_nnx`` and ``from_equinox`` call with the
merged module. Recognised: exact types ``Dense``/``Linear``, ``DenseGeneral``/``LinearGeneral`` (no batch axes),
``Conv`` (ungrouped, unmasked, default convolution) and ``Embed``, called once with one input and the default
``dot_general``; equinox's ``Linear`` (``"scalar"`` features too), ``Conv``/``Conv1d``/``Conv2d``/``Conv3d``
(ungrouped, zero padding) and ``Embedding``, called once on one sample's arrays, not inside a JAX transformation
within the model (a layer under the model's own ``jax.vmap`` or ``lax.scan`` falls back). Flax and equinox are
imported only while a structured kernel traces a model.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import jax.extend.core
import jax.numpy as jnp

from ntkcv.models import equinox_module_hook, nnx_module_hook
from ntkcv.ntk.interception import LayerCall, LayerVisitor, Unfactorised, register_layer_interceptor


class _Active(NamedTuple):
    visitor: LayerVisitor
    nnx_keys: dict[int, str]  # id of a tapped NNX layer -> its key
    equinox_layers: dict[int, tuple[str, Any]]  # id of a tapped equinox layer -> its key, its model's trace state


_ACTIVE: contextvars.ContextVar[_Active | None] = contextvars.ContextVar("ntkcv_layers", default=None)


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
                   nnx_module: bool) -> LayerCall | Unfactorised:
    """A supported call of a supported layer, or why it is not one with the parameters the layer reads."""
    call = _layer_call(module, cls, method, args, kwargs, nnx_module=nnx_module)
    if isinstance(call, LayerCall):
        return call
    if nnx_module:
        from flax import nnx

        params = nnx.state(module, nnx.Param)
    else:
        params = module.variables.get("params", {})
    return Unfactorised(call, tuple(jax.tree_util.tree_leaves(params)))


def _layer_call(module, cls: type, method: str, args: tuple, kwargs: dict, *, nnx_module: bool) -> LayerCall | str:
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
    return LayerCall(kind, config, values, inputs)


def _linen_interceptor(next_fun, args, kwargs, context):
    active = _ACTIVE.get()
    module = context.module
    if active is None or type(module) not in _layer_classes(False) or context.method_name == "setup":
        return next_fun(*args, **kwargs)
    key = "/".join(("linen",) + tuple(module.path))
    describe = functools.partial(_describe_call, module, type(module), context.method_name, args, kwargs,
                                 nnx_module=False)
    return active.visitor.visit(key, describe, lambda: next_fun(*args, **kwargs))


@functools.cache
def _tapped_nnx_class(cls: type) -> type:
    """A subclass of an NNX layer class whose calls go through the active visitor."""

    def wrap(name):
        original = getattr(cls, name)

        def method(self, *args, **kwargs):
            active = _ACTIVE.get()
            key = None if active is None else active.nnx_keys.get(id(self))
            if key is None:
                return original(self, *args, **kwargs)
            describe = functools.partial(_describe_call, self, cls, name, args, kwargs, nnx_module=True)
            return active.visitor.visit(key, describe, lambda: original(self, *args, **kwargs))

        return method

    methods = {name: wrap(name) for name in ("__call__", "attend") if hasattr(cls, name)}
    return type(cls.__name__, (cls,), methods)


def _nnx_hook(module) -> None:
    from flax import nnx

    active = _ACTIVE.get()
    if active is None:
        return
    for path, node in nnx.iter_graph(module):
        if type(node) in _layer_classes(True):
            active.nnx_keys[id(node)] = "/".join(("nnx",) + tuple(str(p) for p in path))
            object.__setattr__(node, "__class__", _tapped_nnx_class(type(node)))


# The current trace, opaque, equal only within one level of tracing (public in jax.extend since JAX 0.10).
_trace_state = jax.extend.core.get_opaque_trace_state


@functools.cache
def _equinox_kinds() -> dict[type, str]:
    """The recognised equinox layer classes (exact types) and the kind of :class:`LayerCall` each makes."""
    import equinox as eqx

    convs = (eqx.nn.Conv, eqx.nn.Conv1d, eqx.nn.Conv2d, eqx.nn.Conv3d)
    return {eqx.nn.Linear: "dense", eqx.nn.Embedding: "embed", **dict.fromkeys(convs, "conv")}


def _describe_equinox(layer, kind: str, args: tuple, kwargs: dict, *, transformed: bool) -> LayerCall | Unfactorised:
    """A supported call of a recognised equinox layer, or why it is not one with the parameters the layer reads.
    equinox layers take one sample, channels first; the :class:`LayerCall` has its inputs channels last (``"scalar"``
    inputs as one feature), and :func:`_features_last` puts the outputs in the same layout."""
    params = {"embedding" if kind == "embed" else "kernel": layer.weight}
    if getattr(layer, "bias", None) is not None:
        params["bias"] = layer.bias
    if transformed:
        why = "called inside a JAX transformation within the model (jax.vmap, lax.scan, …)"
    elif len(args) != 1 or set(kwargs) - {"key"}:
        why = f"called with {len(args)} positional and keyword arguments {sorted(kwargs)}"
    elif kind == "conv" and (layer.groups != 1 or layer.padding_mode != "ZEROS"):
        why = f"has groups={layer.groups}, padding_mode={layer.padding_mode!r} (supported: 1, 'ZEROS')"
    else:
        x = jnp.asarray(args[0])
        if kind == "embed":
            return LayerCall(kind, (), params, x)
        if kind == "dense":
            return LayerCall(kind, ((0,), 1), params, x.reshape(-1))
        rank = layer.num_spatial_dims
        config = (layer.kernel_size, layer.stride, layer.padding, (1,) * rank, layer.dilation)
        return LayerCall(kind, config, params, jnp.moveaxis(x, 0, -1))
    return Unfactorised(why, tuple(params.values()))


def _features_last(kind: str, y: jax.Array) -> jax.Array:
    """An equinox layer's output with its feature axis last (``Conv``: channels first; ``"scalar"``: no axis)."""
    return jnp.moveaxis(y, 0, -1) if kind == "conv" else jnp.atleast_1d(y)


@functools.cache
def _tapped_equinox_class(cls: type) -> type:
    """A subclass of an equinox layer class whose calls go through the active visitor."""
    kind = _equinox_kinds()[cls]

    def call(self, *args, **kwargs):
        active = _ACTIVE.get()
        entry = None if active is None else active.equinox_layers.get(id(self))
        if entry is None:
            return cls.__call__(self, *args, **kwargs)
        key, model_trace = entry
        describe = functools.partial(_describe_equinox, self, kind, args, kwargs,
                                     transformed=_trace_state() != model_trace)
        y = active.visitor.visit(key, describe, lambda: _features_last(kind, cls.__call__(self, *args, **kwargs)))
        if kind == "conv":
            return jnp.moveaxis(y, -1, 0)
        return y.reshape(()) if getattr(self, "out_features", None) == "scalar" else y

    return type(cls.__name__, (cls,), {"__call__": call})


def _equinox_hook(module):
    """``module`` with its recognised layers replaced by tapped copies (same fields, same arrays), each noted with
    its key (``equinox/<path>``) and the trace the model is applied in."""
    active = _ACTIVE.get()
    if active is None:
        return module
    kinds = _equinox_kinds()

    def tap(path, layer):
        if type(layer) not in kinds:
            return layer
        tapped = object.__new__(_tapped_equinox_class(type(layer)))
        vars(tapped).update(vars(layer))
        key = "/".join(("equinox",) + tuple(jax.tree_util.keystr((p,), simple=True) for p in path))
        active.equinox_layers[id(tapped)] = (key, _trace_state())
        return tapped

    return jax.tree_util.tree_map_with_path(tap, module, is_leaf=lambda node: type(node) in kinds)


@register_layer_interceptor
@contextlib.contextmanager
def framework_layers(visitor: LayerVisitor) -> Iterator[None]:
    """Route the calls of recognised linen layers, and of NNX and equinox layers of models made by ``from_nnx`` and
    ``from_equinox``, to ``visitor``."""
    token = _ACTIVE.set(_Active(visitor, {}, {}))
    hook_token = nnx_module_hook.set(_nnx_hook)
    equinox_token = equinox_module_hook.set(_equinox_hook)
    try:
        with contextlib.ExitStack() as stack:
            try:
                import flax.linen as nn
            except ImportError:  # no flax: plain functions only, everything falls back
                pass
            else:
                stack.enter_context(nn.intercept_methods(_linen_interceptor))
            yield
    finally:
        equinox_module_hook.reset(equinox_token)
        nnx_module_hook.reset(hook_token)
        _ACTIVE.reset(token)

