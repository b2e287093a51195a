"""Structured (layer-factorised) NTK: each linear layer's share of Θ from its inputs and output cotangents.

A layer ``y = u W + b`` applied at positions ``t`` (tokens, pixels; one position for a plain Dense) to
the per-sample input rows ``u_{at}`` contributes, for the cotangents ``g_{aort} = ∂f_{or}(x_a)/∂y_{at}``,

.. math::
   Θ^{W,b}_{ab,oq} = \\sum_r \\sum_{t,s} (u_{at}·u_{bs} + 1)\\,(g_{aort}·g_{bqrs})

(``+ 1`` only with a bias). Two contraction orders give it exactly; each layer takes the cheaper one for
its shapes (multiply-adds, ``n₁, n₂`` samples, ``T`` positions, ``d`` inputs (+1 for the bias), ``h``
outputs, ``O`` kept and ``R`` traced outputs):

- ``"gram"``: Gram matrices of inputs and of cotangents, ``n₁ n₂ T² (d + O² R h)``; memory
  ``n₁ n₂ T² O²``. Wins for plain Dense layers (``T = 1``). With ``O > 1`` kept outputs and ``T > 1`` the input
  Gram is carried over to one side's cotangents first, ``n₁ n₂ T (T d + O R h (T + O))``, memory ``n₁ n₂ T O R h``.
- ``"grad"``: per-example weight gradients ``Σ_t u_{at} ⊗ g_{aort}`` contracted pairwise,
  ``(n₁ + n₂) O R T d h + n₁ n₂ O² R d h``; memory ``(n₁ + n₂) O R d h``. Wins for convolutions and
  long sequences.

Covered layers (exact types, ``flax.linen`` and ``flax.nnx``): ``Dense``/``Linear``,
``DenseGeneral``/``LinearGeneral`` (no batch axes; so the query, key, value and output projections of linen's
``MultiHeadDotProductAttention`` and NNX's ``MultiHeadAttention``), ``Conv`` (any stride, padding, input and kernel
dilation, ungrouped, unmasked; patches from ``jax.lax.conv_general_dilated_patches``), and ``Embed``
(``u`` is the one-hot token, so ``u_{at}·u_{bs} = [id_{at} = id_{bs}]``); equinox's ``Linear``, ``Conv``
(1-3d, ungrouped, zero padding) and ``Embedding`` of a model made by ``from_equinox``. A layer is covered only if it
is called exactly once per sample and its parameters are leaves of ``params`` that no other covered
layer reads.

Leaves read by no recognised layer but only elementwise (:mod:`ntkcv.ntk.elementwise`: the scales and biases of
BatchNorm in eval mode, LayerNorm, GroupNorm and RMSNorm in any framework, ``y = n ⊙ γ + β``; learned position
embeddings, class tokens, layer scales) are covered as ``"elementwise"``: their per-sample gradient
``w_{aorf} = Σ_t n_{atf} g_{aortf}`` has the leaf's size, is their cheapest exact factor, and comes out of the same
backward pass; ``Θ^{γ}_{ab,oq} = Σ_{r,f} w_{aorf} w_{bqrf}``. Every other leaf (shared layers, ``Embed.attend``, a
matrix multiplied by hand) *falls back* to the same contraction of its per-sample Jacobian, which costs ``d h`` per
pair where a factorised Dense layer could cost ``d + h``. Which leaf took which path, and why, is logged at DEBUG
level on ``logging.getLogger("ntkcv.ntk")``.

Mechanism: one backward pass per sample and output (vmapped) with respect to zero "probes" added to
every covered layer's output and to the other leaves gives all cotangents ``g`` and the other leaves' per-sample
gradients at once; layer inputs are recorded in the same forward pass. Layers are recognised through
the protocol of :mod:`ntkcv.ntk.interception` (Flax's and equinox's by :mod:`ntkcv.layers`: linen layers
in any ``apply_fn``, NNX and equinox layers of a model made by ``from_nnx`` or ``from_equinox``); elementwise leaves
from the jaxpr of the same trace. Like every implementation this assumes samples do not interact (BatchNorm in eval
mode). A parameter also read outside its layer's call by hand (e.g. ``x @ dense.variables['params']['kernel'].T``)
is not detected; use ``Embed.attend`` or share the module.

Parameter groups (:mod:`ntkcv.ntk.groups`): each covered layer's share and each other leaf's contraction
is added to its group's kernel, all from the same per-sample factors; a layer whose kernel and bias lie in
different groups keeps its kernel covered and contracts its bias as a fallback leaf.

Dispatch: :func:`coverage` says what is covered; :func:`flops` and :func:`tile_bytes` take it as a last
argument and follow the cost and memory protocol of the other implementations.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ntkcv.ntk import jacobian
from ntkcv.ntk.elementwise import non_elementwise_reads, read_order
from ntkcv.ntk.groups import LeafGroups, group_sums
from ntkcv.ntk.interception import LayerCall, Unfactorised, intercepting
from ntkcv.ntk.jacobian import CanonicalFn
from ntkcv.ntk.profile import ModelProfile
from ntkcv.ntk.tiling import after, tile_starts

logger = logging.getLogger("ntkcv.ntk")

_MEMORY_LIMIT = 2**27  # elements a route may create for one sample or pair before the other is preferred


class _Call(NamedTuple):
    """One recognised layer call: the :class:`LayerCall` with leaf indices as params and its input and output shapes
    (``None`` when it is not factorised), the reason it is not, and the indices of the leaves it reads."""

    layer: tuple[LayerCall, jax.ShapeDtypeStruct, jax.ShapeDtypeStruct] | None
    reason: str
    leaves: tuple[int, ...]


class _Discovery:
    """Records every recognised layer call: key -> [:class:`_Call`]."""

    def __init__(self, leaves):
        self.leaf_index = {id(leaf): i for i, leaf in enumerate(leaves)}
        self.calls: dict[str, list[_Call]] = {}

    def visit(self, key, describe, call):
        y = call()
        layer = describe()
        if isinstance(layer, str):
            layer = Unfactorised(layer, ())
        read = [self.leaf_index.get(id(v))
                for v in (layer.params.values() if isinstance(layer, LayerCall) else layer.params)]
        leaves = tuple(i for i in read if i is not None)
        if isinstance(layer, Unfactorised):
            entry = _Call(None, layer.reason, leaves)
        elif len(leaves) != len(read):
            entry = _Call(None, "reads parameters that are not leaves of params (transformed or closed over)", leaves)
        else:
            shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (layer.inputs, y)]
            entry = _Call((layer._replace(params=dict(zip(layer.params, leaves, strict=True))), *shapes), "", leaves)
        self.calls.setdefault(key, []).append(entry)
        return y


class _Probe:
    """Adds ``probes[key]`` to each planned layer's output and records its input."""

    def __init__(self, probes):
        self.probes = probes
        self.inputs: dict[str, jax.Array] = {}

    def visit(self, key, describe, call):
        y = call()
        if key in self.probes:
            self.inputs[key] = describe().inputs
            y = y + self.probes[key]
        return y


# --------------------------------------------------------------------------- plan


class _Planned(NamedTuple):
    key: str
    kind: str
    config: tuple
    roles: dict  # role -> leaf index
    inputs: jax.ShapeDtypeStruct  # of one sample's call
    outputs: jax.ShapeDtypeStruct
    positions: int  # T
    in_size: int  # d, +1 with a bias; the vocabulary size for Embed
    out_size: int  # h


class _Plan(NamedTuple):
    treedef: Any
    leaves: list
    layers: tuple[_Planned, ...]
    gradients: tuple[int, ...]  # indices of the leaves contracted as per-sample gradients (elementwise and fallback)
    elementwise: frozenset[int]  # those read elementwise (:mod:`ntkcv.ntk.elementwise`); the others fall back
    reasons: dict  # fallback leaf index -> reason
    out_shape: tuple[int, int]  # (O, R)
    groups: LeafGroups | None  # each leaf's parameter group; None: one group
    read_order: tuple[int, ...]  # the leaves in the order the forward pass first reads them


def _sizes(kind, config, roles, inputs, outputs, leaf_shapes):
    if kind == "embed":
        vocab = leaf_shapes[roles["embedding"]][0]
        return math.prod(inputs.shape), vocab, outputs.shape[-1]
    bias = 1 if "bias" in roles else 0
    if kind == "dense":
        axes, n_features = config
        d = math.prod(inputs.shape[a] for a in axes)
        h = math.prod(outputs.shape[len(outputs.shape) - n_features :])
    else:
        d, h = math.prod(config[0]) * inputs.shape[-1], outputs.shape[-1]
    return math.prod(outputs.shape) // h, d + bias, h


def _bias_apart(key: str, roles: dict, groups: LeafGroups | None, reasons: dict) -> dict:
    """A layer's roles without its bias when that lies in another parameter group than its kernel (the bias is then
    contracted as a fallback leaf)."""
    if groups is None or "bias" not in roles or groups[roles["bias"]] == groups[roles["kernel"]]:
        return roles
    reasons[roles["bias"]] = f"{key}: bias in another parameter group than the kernel"
    return {"kernel": roles["kernel"]}


def _plan(f: CanonicalFn, params: Any, x: jax.Array, groups: LeafGroups | None = None) -> _Plan:
    leaves, treedef = jax.tree_util.tree_flatten(params)
    discovery = None

    def run(leaves, sample):
        nonlocal discovery
        discovery = _Discovery(leaves)
        with intercepting(discovery):
            return f(jax.tree_util.tree_unflatten(treedef, leaves), sample[None])

    jaxpr, out = jax.make_jaxpr(run, return_shape=True)(leaves, x[0])
    shapes = [jnp.shape(leaf) for leaf in leaves]
    layers, owner, reasons = [], {}, {}
    for key, calls in discovery.calls.items():
        call = calls[0]
        if len(calls) != 1 or call.layer is None:
            why = call.reason if call.layer is None else f"layer called {len(calls)} times"
            reasons.update({i: f"{key}: {why}" for entry in calls for i in entry.leaves})
            continue
        layer, inputs, outputs = call.layer
        if any(i in owner for i in layer.params.values()):
            for i in layer.params.values():
                reasons[i] = f"{key}: parameters shared with {owner.get(i, key)}"
            continue
        owner.update({i: key for i in layer.params.values()})
        roles = _bias_apart(key, layer.params, groups, reasons)
        sizes = _sizes(layer.kind, layer.config, roles, inputs, outputs, shapes)
        layers.append(_Planned(key, layer.kind, layer.config, roles, inputs, outputs, *sizes))
    shared = {i for i, why in reasons.items() if "shared with" in why}
    layers = [layer for layer in layers if not shared & set(layer.roles.values())]
    covered = {i for layer in layers for i in layer.roles.values()}
    gradients = tuple(i for i in range(len(leaves)) if i not in covered)
    # leaves read by no recognised layer: elementwise unless some primitive reads them otherwise
    unclaimed = [i for i in gradients if i not in reasons]
    for i, primitive in non_elementwise_reads(jaxpr, unclaimed, [len(leaves)]).items():
        reasons[i] = f"not read by a supported layer; read by {primitive}"
    elementwise = frozenset(unclaimed) - set(reasons)
    plan = _Plan(treedef, leaves, tuple(layers), gradients, elementwise, reasons, tuple(out.shape[1:]), groups,
                 tuple(read_order(jaxpr, range(len(leaves)))))
    if logger.isEnabledFor(logging.DEBUG):
        paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
        for layer in layers:
            for i in layer.roles.values():
                logger.debug("structured: %s (%s %s, T=%d d=%d h=%d)", paths[i], layer.kind, layer.key,
                             layer.positions, layer.in_size, layer.out_size)
        for i in gradients:
            if i in elementwise:
                logger.debug("structured: %s (elementwise, %d parameters: its per-sample gradient)", paths[i],
                             math.prod(shapes[i]))
            else:
                logger.debug("structured: %s falls back to jacobian (%s)", paths[i], reasons[i])
        for key, calls in discovery.calls.items():
            for why in dict.fromkeys(call.reason for call in calls if call.layer is None):
                logger.debug("structured: layer %s is not factorised (%s)", key, why)
    return plan


# --------------------------------------------------------------------------- per-sample factors


def _patches(u, config):
    """One call's input patches ``(T, d)``, one row per output position: the padded (and, for a transposed
    convolution, dilated) input sliced once per kernel offset (features ordered (offset, channel); only inner
    products of rows are used). ``lax.conv_general_dilated_patches`` gives the same rows as a convolution with a
    one-hot kernel, ``T d²`` multiply-adds as written (9 times the layer's own for a 3×3 kernel)."""
    kernel_size, strides, padding, lhs_dilation, rhs_dilation = config
    rank = len(kernel_size)
    u = u.reshape((-1,) + u.shape[u.ndim - rank - 1 :])  # all batch axes (or none) into one
    if padding in ("CIRCULAR", "REFLECT"):
        dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, rhs_dilation, strict=True)]
        pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in dilated] + [(0, 0)]
        u, padding = jnp.pad(u, pads, mode={"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding]), "VALID"
    elif padding == "CAUSAL":
        u, padding = jnp.pad(u, [(0, 0), (rhs_dilation[0] * (kernel_size[0] - 1), 0), (0, 0)]), "VALID"
    window = [(k - 1) * d + 1 for k, d in zip(kernel_size, rhs_dilation, strict=True)]
    if isinstance(padding, str):  # as lax.conv_general_dilated: only without input dilation
        padding = jax.lax.padtype_to_pads(u.shape[1:-1], window, strides, padding)
    u = jax.lax.pad(u, jnp.zeros((), u.dtype), [(0, 0, 0), *((lo, hi, dilation - 1) for (lo, hi), dilation
                                                            in zip(padding, lhs_dilation, strict=True)), (0, 0, 0)])
    out = [(n - w) // s + 1 for n, w, s in zip(u.shape[1:-1], window, strides, strict=True)]
    slices = []
    for offset in itertools.product(*map(range, kernel_size)):
        start = [o * d for o, d in zip(offset, rhs_dilation, strict=True)]
        limit = [b + (n - 1) * s + 1 for b, n, s in zip(start, out, strides, strict=True)]
        slices.append(jax.lax.slice(u, (0, *start, 0), (u.shape[0], *limit, u.shape[-1]), (1, *strides, 1)))
    patches = jnp.concatenate(slices, axis=-1)
    return patches.reshape(-1, patches.shape[-1])


def _factor(layer: _Planned, u: jax.Array, g: jax.Array, kept: int, traced: int, dtype):
    """One sample's input rows ``(T, d)`` (token ids ``(T,)`` for Embed) and cotangents ``(T, O, R, h)``.

    ``g`` arrives with the basis axis just before the feature axes: ``(…, O·R, *features)``. Both are
    cast to the kernel's dtype (a float32 layer inside a float64 model is contracted in float64).
    """
    g = g.reshape(layer.positions, kept, traced, layer.out_size).astype(dtype)
    if layer.kind == "embed":
        return u.reshape(-1), g
    if layer.kind == "dense":
        axes = layer.config[0]
        u = jnp.moveaxis(u, axes, tuple(range(u.ndim - len(axes), u.ndim)))
        u = u.reshape(layer.positions, -1)
    else:
        u = _patches(u, layer.config)
    if "bias" in layer.roles:
        u = jnp.concatenate([u, jnp.ones(u.shape[:-1] + (1,), u.dtype)], axis=-1)
    return u.astype(g.dtype), g


def _per_sample(f: CanonicalFn, plan: _Plan, x: jax.Array):
    """Per-sample factors ``{key: (U (N, T, d), G (N, T, O, R, h))}``, the other leaves' per-sample gradients
    ``(N, O, R, …)``."""

    def single(sample):
        def probed(probes, gradients):
            leaves = list(plan.leaves)
            for i, leaf in zip(plan.gradients, gradients, strict=True):
                leaves[i] = leaf
            with intercepting(_Probe(probes)) as probe:
                out = f(jax.tree_util.tree_unflatten(plan.treedef, leaves), sample[None])[0]
            return out, probe.inputs

        probes = {layer.key: jnp.zeros(layer.outputs.shape, layer.outputs.dtype) for layer in plan.layers}
        gradients = [plan.leaves[i] for i in plan.gradients]
        out, vjp_fn, inputs = jax.vjp(probed, probes, gradients, has_aux=True)
        kept, traced = out.shape
        basis = jnp.eye(kept * traced, dtype=out.dtype).reshape(kept * traced, kept, traced)
        # the basis axis lands next to the features, so cotangents come out as (positions, basis, features)
        feature_axis = {layer.key: len(layer.outputs.shape) - _feature_axes(layer) for layer in plan.layers}
        cot_probes, cot_gradients = jax.vmap(vjp_fn, out_axes=(feature_axis, 0))(basis)
        factors = {layer.key: _factor(layer, inputs[layer.key], cot_probes[layer.key], kept, traced,
                                      out.dtype) for layer in plan.layers}
        jac = [c.reshape((kept, traced) + c.shape[1:]) for c in cot_gradients]
        return factors, jac

    return jax.vmap(single)(x)


def _feature_axes(layer: _Planned) -> int:
    return layer.config[1] if layer.kind == "dense" else 1


# --------------------------------------------------------------------------- contractions


def _weight_gradient_macs(layer: _Planned) -> int:
    """Multiply-adds of one sample's weight gradient for one output: ``T d h`` (a scatter of ``T h`` for Embed)."""
    return layer.positions * layer.out_size * (1 if layer.kind == "embed" else layer.in_size)


def _route_costs(layer: _Planned, n1: int, n2: int, kept: int, traced: int, *, same: bool,
                 diagonal: bool = False):
    """Multiply-adds and memory (elements) of the two routes for one layer, and the memory of one pair (``"gram"``)
    or one sample (``"grad"``): ``{route: (macs, elements, elements of one)}``."""
    t, d, h = layer.positions, layer.in_size, layer.out_size
    pairs = n1 if diagonal else n1 * n2
    built = n1 if same or diagonal else n1 + n2
    inputs = t * t * (1 if layer.kind == "embed" else d)
    if kept == 1 or t == 1:  # cotangent Gram, then weighted by the input Gram
        gram, pair = inputs + t * t * kept * kept * traced * h, t * t * (kept * kept + 1)
    else:  # input Gram carried over to one side's cotangents first (see _layer_kernel)
        gram, pair = inputs + t * kept * traced * h * (t + kept), t * (t + kept * traced * h)
    build = built * kept * traced * _weight_gradient_macs(layer)
    grad = build + pairs * kept * kept * traced * d * h
    sample = kept * traced * d * h
    return {"gram": (pairs * gram, pairs * pair, pair), "grad": (grad, built * sample, sample)}


def _choose(costs) -> str:
    """The route of fewer multiply-adds, unless one pair's or one sample's intermediate would be too large (tiles
    and chunks bound how many are held at once)."""
    fits = {route: c for route, c in costs.items() if c[2] <= _MEMORY_LIMIT} or costs
    return min(fits, key=lambda route: fits[route][0])


def _input_gram(layer, u1, u2, dtype):
    """``(N₁, T, N₂, T)`` Gram matrix of input rows (of one-hot tokens for Embed)."""
    if layer.kind == "embed":
        return (u1[:, :, None, None] == u2[None, None, :, :]).astype(dtype)
    return jnp.einsum("atd,bsd->atbs", u1, u2)


def _weight_grads(layer, u, g):
    """Per-example weight gradients ``Σ_t u_{at} ⊗ g_{at}``, shape ``(N, O, R·d·h)``."""
    n, t, kept, traced, h = g.shape
    if layer.kind == "embed":
        def scatter(ids, gs):
            return jnp.zeros((layer.in_size, kept * traced * h), gs.dtype).at[ids].add(gs.reshape(t, -1))

        w = jax.vmap(scatter)(u, g)
    else:
        w = jnp.matmul(jnp.swapaxes(u, 1, 2), g.reshape(n, t, -1))  # (N, d, O·R·h)
    w = w.reshape(n, -1, kept, traced, h)
    return jnp.moveaxis(w, 2, 1).reshape(n, kept, -1)


def _pair_products(w1, w2):
    """``(N₁, O, M), (N₂, O, M) -> (N₁, N₂, O, O)`` as one matrix product."""
    (n1, kept, _), n2 = w1.shape, w2.shape[0]
    products = w1.reshape(n1 * kept, -1) @ w2.reshape(n2 * kept, -1).T
    return products.reshape(n1, kept, n2, kept).transpose(0, 2, 1, 3)


def _layer_kernel(layer, features1, features2, route):
    if route == "grad":
        return _pair_products(features1[0], features2[0])
    (u1, g1), (u2, g2) = features1, features2
    if layer.positions == 1:  # plain Dense: (u_a·u_b) (g_a·g_b)
        a = _input_gram(layer, u1, u2, g1.dtype)[:, 0, :, 0]
        return a[:, :, None, None] * _pair_products(g1[:, 0].reshape(g1.shape[0], g1.shape[2], -1),
                                                    g2[:, 0].reshape(g2.shape[0], g2.shape[2], -1))
    a = _input_gram(layer, u1, u2, g1.dtype)
    if g1.shape[2] == 1:  # one kept output: the cotangents' Gram (n₁T × n₂S) in one product
        b = jnp.einsum("atorh,bsqrh->atbsoq", g1, g2)
        return jnp.einsum("atbs,atbsoq->aboq", a, b)
    # O kept outputs: n₁n₂T(S + O)ORh multiply-adds instead of the cotangent Gram's n₁n₂T²O²Rh
    carried = jnp.einsum("atbs,bsqrh->atbqrh", a, g2)
    return jnp.einsum("atorh,atbqrh->aboq", g1, carried)


def _layer_diagonal(layer, factors, route):
    u, g = factors
    if route == "gram":
        if layer.kind == "embed":
            a = (u[:, :, None] == u[:, None, :]).astype(g.dtype)
        else:
            a = jnp.einsum("atd,asd->ats", u, u)
        return jnp.einsum("ats,atorh,asqrh->aoq", a, g, g)
    w = _weight_grads(layer, u, g)
    return jnp.einsum("aom,aqm->aoq", w, w)


def _leaf(layer: _Planned) -> int:
    """A leaf of the layer (all of its leaves are in one parameter group)."""
    return next(iter(layer.roles.values()))


def _routes(plan: _Plan, n1: int, n2: int, *, same: bool) -> dict[str, str]:
    kept, traced = plan.out_shape
    return {layer.key: _choose(_route_costs(layer, n1, n2, kept, traced, same=same)) for layer in plan.layers}


def units(cover: Coverage) -> int:
    """How many units :func:`split_fn` and :func:`split_bytes` can be restricted to (``chunk``): the leaves taken as
    per-sample gradients, then the covered layers in the order they are called."""
    return len(cover.plan.gradients) + len(cover.plan.layers)


def _chunk(plan: _Plan, chunk: Sequence[int] | None) -> _Plan:
    """The plan restricted to the units numbered ``chunk`` (see :func:`units`; ``None``: all). Its backward passes
    stop at the first layer whose cotangents or gradients it needs."""
    if chunk is None:
        return plan
    first = len(plan.gradients)
    return plan._replace(gradients=tuple(plan.gradients[u] for u in chunk if u < first),
                         layers=tuple(plan.layers[u - first] for u in chunk if u >= first))


def _factor_elements(layer: _Planned, kept: int, traced: int) -> int:
    """Elements of one sample's input rows and cotangents (token ids for Embed)."""
    return layer.positions * ((1 if layer.kind == "embed" else layer.in_size) + kept * traced * layer.out_size)


def _deferred(plan: _Plan, routes: dict[str, str]) -> tuple[_Planned, ...]:
    """The ``"grad"`` layers whose inputs and cotangents are fewer elements than their weight gradients: with
    ``defer`` they are stored as such, and their weight gradients formed per contraction tile."""
    kept, traced = plan.out_shape
    return tuple(layer for layer in plan.layers if routes[layer.key] == "grad"
                 and _factor_elements(layer, kept, traced) < kept * traced * layer.in_size * layer.out_size)


def split_fn(f: CanonicalFn, params: Any, x: jax.Array, n1: int, n2: int, *, same: bool,
             cover: Coverage | None = None, chunk: Sequence[int] | None = None, defer: bool = False):
    """``(features_fn, contract_fn)`` for an ``n₁ × n₂`` kernel: ``features_fn(x_tile)`` builds each sample's
    share once (per layer, the factors its route contracts: ``(U, G)`` for "gram", the weight gradient for
    "grad"; the other leaves' per-sample gradients), ``contract_fn(F₁, F₂)`` pairs them up into one ``(b₁, b₂, O,
    O)`` kernel per parameter group. A tiled kernel then builds every sample's features once, however many tiles it
    is cut into.
    ``None`` when no layer is covered. ``cover``: :func:`coverage` of the same ``f``, ``params`` and inputs, whose
    trace and parameter groups are then used; ``None``: traced here, one group. ``chunk``: only these units (see
    :func:`units`; ``None``: all); the kernels summed over chunks that partition the units are Θ_g. ``defer``: the
    "grad" layers whose inputs and cotangents are smaller than their weight gradients store those, and
    ``contract_fn`` forms their weight gradients, one layer after the other, per contraction tile instead of once per
    sample (a ResNet-18 stage-3 layer's inputs and cotangents are 19 times smaller than its weight gradients)."""
    plan = _plan(f, params, x) if cover is None else cover.plan
    if not plan.layers:
        return None
    plan = _chunk(plan, chunk)
    routes = _routes(plan, n1, n2, same=same)
    deferred = _deferred(plan, routes) if defer else ()
    for layer in plan.layers:
        logger.debug("structured: %s takes the %s route for a %dx%d kernel%s", layer.key, routes[layer.key], n1, n2,
                     ", weight gradients formed per tile" if layer in deferred else "")

    def features_fn(x_tile):
        factors, jac = _per_sample(f, plan, x_tile)
        layers = {layer.key: (_weight_grads(layer, *factors[layer.key]),)
                  if routes[layer.key] == "grad" and layer not in deferred else factors[layer.key]
                  for layer in plan.layers}
        return layers, jac

    def contract_fn(features1, features2):
        same_tile = features1 is features2
        (layers1, jac1), (layers2, jac2) = features1, features2
        gradients = zip(plan.gradients, map(jacobian.contract_leaf, jac1, jac2), strict=True)
        covered = [(_leaf(layer), _layer_kernel(layer, layers1[layer.key], layers2[layer.key], routes[layer.key]))
                   for layer in plan.layers if layer not in deferred]
        previous = None  # one deferred layer's weight gradients at a time
        for layer in deferred:
            sides = (layers1[layer.key], layers2[layer.key])
            if previous is not None:
                sides = after(previous, sides)
            w1 = _weight_grads(layer, *sides[0])
            w2 = w1 if same_tile else _weight_grads(layer, *sides[1])
            previous = _pair_products(w1, w2)
            covered.append((_leaf(layer), previous))
        return group_sums(itertools.chain(gradients, covered), plan.groups)

    return features_fn, contract_fn


def kernel_tile(f: CanonicalFn, params: Any, x1: jax.Array, x2: jax.Array | None, *,
                cover: Coverage | None = None) -> tuple[jax.Array, ...]:
    """Θ_g(x₁, x₂) of shape ``(N₁, N₂, O, O)`` for each parameter group, layer-factorised where possible;
    ``x2=None``: ``x2 = x1``. ``cover``: as for :func:`split_fn`."""
    n1 = x1.shape[0]
    n2 = n1 if x2 is None else x2.shape[0]
    split = split_fn(f, params, x1, n1, n2, same=x2 is None, cover=cover)
    if split is None:
        return jacobian.kernel_tile(f, params, x1, x2, groups=None if cover is None else cover.plan.groups)
    features_fn, contract_fn = split
    features1 = features_fn(x1)
    return contract_fn(features1, features1 if x2 is None else features_fn(x2))


def diagonal_tile(f: CanonicalFn, params: Any, x: jax.Array, *,
                  cover: Coverage | None = None) -> tuple[jax.Array, ...]:
    """Θ_g(x_a, x_a) for each sample and parameter group, shape ``(N, O, O)``; ``cover``: as for :func:`split_fn`."""
    plan = _plan(f, params, x) if cover is None else cover.plan
    if not plan.layers:
        return jacobian.diagonal_tile(f, params, x, groups=plan.groups)
    factors, jac = _per_sample(f, plan, x)
    kept, traced = plan.out_shape
    routes = {layer.key: _choose(_route_costs(layer, x.shape[0], x.shape[0], kept, traced, same=True, diagonal=True))
              for layer in plan.layers}
    gradients = zip(plan.gradients, map(jacobian.contract_leaf_diagonal, jac), strict=True)
    covered = ((_leaf(layer), _layer_diagonal(layer, factors[layer.key], routes[layer.key])) for layer in plan.layers)
    return group_sums(itertools.chain(gradients, covered), plan.groups)


# --------------------------------------------------------------------------- coverage and cost model


class LayerCoverage(NamedTuple):
    """A covered layer: its key (``linen/<path>``, ``nnx/<path>`` or ``equinox/<path>``), kind, leaves and factor
    sizes."""

    key: str
    kind: str
    leaves: tuple[str, ...]
    positions: int  # T
    in_size: int  # d (+1 with a bias; vocabulary size for Embed)
    out_size: int  # h


class Coverage(NamedTuple):
    """What :func:`kernel_tile` does for one model: covered layers, leaves read elementwise and fallback leaves (with
    reasons)."""

    layers: tuple[LayerCoverage, ...]
    elementwise: tuple[str, ...]  # leaf paths
    fallback: tuple[tuple[str, str], ...]  # (leaf path, reason)
    covered_size: int  # parameters in covered layers and elementwise leaves
    fallback_size: int  # parameters of fallback leaves
    gradient_size: int  # parameters contracted as per-sample gradients: elementwise and fallback leaves
    plan: _Plan  # the traced plan: per-layer sizes for the cost model, reused by the kernel functions


def coverage(f: CanonicalFn, params: Any, x: jax.Array, groups: LeafGroups | None = None) -> Coverage:
    """Which leaves of ``params`` the structured kernel covers for ``f(params, x) -> (N, O, R)``, with the kernel
    split into parameter groups (``groups``: each leaf's group; ``None``: one group).

    One abstract trace of ``f`` on ``x[:1]`` (shapes only, no computation); works inside ``jit``.
    """
    plan = _plan(f, params, x, groups)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    sizes = [math.prod(jnp.shape(leaf)) for leaf in plan.leaves]
    layers = tuple(
        LayerCoverage(layer.key, layer.kind, tuple(paths[i] for i in layer.roles.values()), layer.positions,
                      layer.in_size, layer.out_size)
        for layer in plan.layers
    )
    fallback = [i for i in plan.gradients if i not in plan.elementwise]
    fallback_size = sum(sizes[i] for i in fallback)
    return Coverage(layers, tuple(paths[i] for i in plan.gradients if i in plan.elementwise),
                    tuple((paths[i], plan.reasons[i]) for i in fallback), sum(sizes) - fallback_size, fallback_size,
                    sum(sizes[i] for i in plan.gradients), plan)


def flops(profile: ModelProfile, n1: int, n2: int, cover: Coverage) -> float:
    """Estimated FLOPs of an ``n₁ × n₂`` kernel, in the units of :func:`ntkcv.ntk.jacobian.flops`.

    ``(n₁+n₂)·O·R`` backward passes (≈ 3 forward passes each, as for ``"jacobian"``, less the ``2W`` FLOPs of the
    covered layers' weight gradients, ``W = Σ T d h``, which they do not form; at least one forward pass), plus
    twice the multiply-adds of each covered layer's cheaper route (see the module docstring), plus the contraction
    ``2 n₁ n₂ O² R P_g`` of the leaves taken as per-sample gradients (elementwise and fallback).

    A layer's ``"grad"`` route forms the weight gradients that the Jacobian's backward passes would and contracts
    them as the Jacobian would, so this is ``jacobian.flops`` less ``2 Σ (grad − route)`` over the layers, the
    multiply-adds each saves by its cheaper route: never more, and equal (computed as that difference, so exactly)
    when no layer saves. ``"auto"`` takes the minimum of this, ``jacobian.flops`` and ``ntvp.flops``.
    """
    o, r, forward = profile.kept, profile.traced, profile.forward_flops
    saved, weight_gradients = 0, 0
    for layer in cover.plan.layers:
        costs = _route_costs(layer, n1, n2, o, r, same=False)
        saved += costs["grad"][0] - costs[_choose(costs)][0]
        weight_gradients += 2 * _weight_gradient_macs(layer)
    total = (n1 + n2) * o * r * 3 * forward + 2.0 * n1 * n2 * o * o * r * profile.num_params - 2.0 * saved
    return total + (n1 + n2) * o * r * max(weight_gradients - 2 * forward, 0)  # backward passes of one forward


def tile_bytes(profile: ModelProfile, b1: int, b2: int, cover: Coverage) -> int:
    """Peak bytes of one ``b₁ × b₂`` tile: per-sample factors and gradients of both tiles, the
    backward passes' activations, each layer's route intermediates and the kernel block."""
    o, r, item = profile.kept, profile.traced, profile.itemsize
    elements = (b1 + b2) * o * r * cover.gradient_size + 2 * b1 * b2 * o * o
    for layer in cover.plan.layers:
        costs = _route_costs(layer, b1, b2, o, r, same=False)
        elements += (b1 + b2) * layer.positions * (layer.in_size + o * r * layer.out_size)
        elements += costs[_choose(costs)][1]
    return elements * item + (b1 + b2) * o * r * profile.activation_bytes


def split_bytes(profile: ModelProfile, n1: int, n2: int, cover: Coverage, *, same: bool,
                chunk: Sequence[int] | None = None, defer: bool = False):
    """Memory of :func:`split_fn`'s path (for the units numbered ``chunk``; ``None``: all; ``defer`` as there):
    ``(bytes of one sample's stored features, build_bytes(b), contract_bytes(b₁, b₂))``, the last two the peaks of
    building ``b`` samples' features and of contracting a ``b₁ × b₂`` tile (with ``defer``, one deferred layer's
    weight gradients of both tiles at a time)."""
    o, r, item = profile.kept, profile.traced, profile.itemsize
    plan = _chunk(cover.plan, chunk)
    routes = _routes(plan, n1, n2, same=same)
    deferred = _deferred(plan, routes) if defer else ()
    stored = o * r * sum(math.prod(jnp.shape(plan.leaves[i])) for i in plan.gradients)
    factors, pair, formed = 0, 0, 0
    for layer in plan.layers:
        t, d, h = layer.positions, layer.in_size, layer.out_size
        factors += t * (d + o * r * h)
        if routes[layer.key] == "grad" and layer not in deferred:
            stored += o * r * d * h
        else:
            stored += _factor_elements(layer, o, r)
        if layer in deferred:
            formed = max(formed, o * r * d * h)
        elif routes[layer.key] == "gram" and t > 1:
            pair += _route_costs(layer, 1, 1, o, r, same=True)["gram"][2]

    def build_bytes(b: int, _: int = 0) -> int:
        return b * ((stored + factors) * item + o * r * profile.activation_bytes)

    def contract_bytes(b1: int, b2: int) -> int:
        return (b1 * b2 * (pair + 2 * o * o) + (b1 + b2) * formed) * item

    return stored * item, build_bytes, contract_bytes


def deferral_macs(profile: ModelProfile, n1: int, n2: int, cover: Coverage, tiles: tuple[int, int], *, same: bool,
                  chunk: Sequence[int] | None = None) -> int:
    """Multiply-adds that ``defer`` adds to :func:`split_fn` contracted in ``b₁ × b₂`` ``tiles``
    (:func:`ntkcv.ntk.tiling.tile_starts`): each deferred layer's weight gradients, ``O R T d h`` per sample, formed
    for both sides of every tile (once for a tile against itself) instead of once per sample."""
    (b1, b2), o, r = tiles, profile.kept, profile.traced
    plan = _chunk(cover.plan, chunk)
    if same and (b1, b2) == (n1, n2):
        return 0
    deferred = _deferred(plan, _routes(plan, n1, n2, same=same))
    per_sample = o * r * sum(_weight_gradient_macs(layer) for layer in deferred)
    symmetric = same and b1 == b2
    formed = sum(b1 if symmetric and row == column else b1 + b2
                 for row, column in tile_starts(n1, n2, tiles, symmetric=symmetric))
    return (formed - (n1 if same else n1 + n2)) * per_sample


def backward_share(cover: Coverage, chunk: Sequence[int]) -> float:
    """The share of a whole backward pass that the units numbered ``chunk`` need (it stops at their first layer):
    1 with a leaf taken as a per-sample gradient, else the covered layers' ``Σ T d h`` from the first one on over
    all of theirs (a layer's backward pass costs about its forward multiply-adds)."""
    plan, first = cover.plan, len(cover.plan.gradients)
    if min(chunk) < first:
        return 1.0
    work = [_weight_gradient_macs(layer) for layer in plan.layers]
    return sum(work[min(chunk) - first:]) / sum(work)
