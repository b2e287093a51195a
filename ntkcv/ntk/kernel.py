"""The public factory :func:`ntk_fn` and the choice between implementations."""

from __future__ import annotations

import enum
import functools
import logging
import warnings
from collections.abc import Callable, Sequence
from types import ModuleType

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PyTree, Shaped

from ntkcv.ntk import jacobian, ntvp, structured
from ntkcv.ntk.compilation import ntk_compile_options
from ntkcv.ntk.devices import OnAllDevices, laid_out, num_devices
from ntkcv.ntk.groups import GroupSpec, LeafGroups, check_groups, partition
from ntkcv.ntk.layout import ApplyFn, canonical_fn, output_layout
from ntkcv.ntk.profile import ModelProfile, profile_model
from ntkcv.ntk.tiling import (
    default_memory_budget,
    plan_chunks,
    plan_parts,
    plan_split,
    plan_tiles,
    tiled_kernel,
    tiled_per_sample,
    tiled_split_chunks,
)
from ntkcv.ntk.validate import check_inputs, check_params

logger = logging.getLogger("ntkcv.ntk")


class Implementation(enum.StrEnum):
    """How the empirical NTK is computed. All are exact to rounding; they differ in cost.

    - ``JACOBIAN``: per-sample Jacobians ``J`` (reverse mode), then ``Θ_g = Σ_{leaves in g} J₁J₂ᵀ``. Cost
      ``(N₁+N₂)·O·R`` backward passes and an ``N₁N₂O²RP`` contraction; memory ``(N₁+N₂)·O·R·P``. Best for
      small ``P`` with expensive forward passes (weight sharing, convolutions).
    - ``NTVP``: NTK-vector products: every per-sample gradient of ``x₂`` pushed forward through the
      model at ``x₁``. Cost ``N₂·O·R`` backward plus ``N₁N₂·O·R`` forward passes, no contraction over
      ``P``. Best for full (untraced) kernels of wide dense models. Gives the whole Θ only, not parameter groups.
    - ``STRUCTURED``: layer-factorised: each Dense/DenseGeneral/Conv/Embed layer's share of Θ (attention
      projections too) from its inputs and per-output cotangents, in the cheaper of two contraction orders;
      parameters read elementwise (norm scales and biases, position embeddings, class tokens) as their
      per-sample gradients, formed by the same backward pass; other leaves fall back to the Jacobian
      contraction. Never builds a Jacobian of a covered layer and never costs more FLOPs than ``JACOBIAN``; the
      fast path for monitoring. Parameter groups come from the same pass: each layer's share and leaf's
      contraction go to their group.
    - ``AUTO``: the implementation with the smallest FLOP estimate for these shapes, from XLA's cost
      analysis of one forward pass and the layers ``structured`` covers (see each module's ``flops``);
      ties go to ``structured``, then ``jacobian``; with parameter groups, ``ntvp`` is not a candidate.
    """

    JACOBIAN = "jacobian"
    NTVP = "ntvp"
    STRUCTURED = "structured"
    AUTO = "auto"


_MODULES: dict[Implementation, ModuleType] = {
    Implementation.JACOBIAN: jacobian, Implementation.NTVP: ntvp, Implementation.STRUCTURED: structured}


_GROUPED = (Implementation.JACOBIAN, Implementation.STRUCTURED)  # the implementations that split Θ into groups


class _Costs:
    """Each implementation's ``flops(n1, n2)`` and ``tile_bytes(b1, b2)`` for one model, input shape and parameter
    groups (``groups``: each leaf's group; ``None``: one group), and the keyword arguments its tile functions take
    (the groups; for ``structured`` the coverage, whose trace of the model they reuse); :meth:`splits` plans the
    path that builds each sample's features once when one tile does not fit."""

    def __init__(self, f, params, x, profile: ModelProfile, groups: LeafGroups | None = None):
        cover = structured.coverage(f, params, x, groups)
        self.options = {Implementation.JACOBIAN: {"groups": groups}, Implementation.NTVP: {},
                        Implementation.STRUCTURED: {"cover": cover}}
        model = {Implementation.JACOBIAN: {}, Implementation.NTVP: {}, Implementation.STRUCTURED: {"cover": cover}}
        self.flops = {impl: functools.partial(module.flops, profile, **model[impl])
                      for impl, module in _MODULES.items()}
        # each group after the first holds one more (O, O) kernel block per pair of samples
        self._block_bytes = (0 if groups is None else max(groups)) * profile.kept**2 * profile.itemsize
        self.tile_bytes = {impl: self._with_blocks(functools.partial(module.tile_bytes, profile, **model[impl]))
                           for impl, module in _MODULES.items()}
        self._profile, self._cover, self._groups = profile, cover, groups
        self._leaf_sizes = [leaf.size for leaf in jax.tree_util.tree_leaves(params)]

    def _with_blocks(self, tile_bytes: Callable[[int, int], int]) -> Callable[[int, int], int]:
        return lambda b1, b2: tile_bytes(b1, b2) + b1 * b2 * self._block_bytes

    def splits(self, chosen: Implementation, f, params, x, n1: int, n2: int, *, same: bool, budget: int,
               devices: int) -> list[tuple[Callable, Callable, int, tuple[int, int]]] | None:
        """The chunks of ``chosen``'s split path for :func:`tiled_split_chunks`, each sample's features built once per
        chunk and contracted in tiles: chunks of consecutive units (for ``jacobian`` leaves in the order the model
        reads them, a leaf cut into slices of its parameters when it does not fit whole; for ``structured``
        gradient leaves and layers) whose features of all samples take at most half of ``budget``, the rest for
        building them and one tile's work; ``None`` when one unit's do not fit.

        ``structured`` also tries deferring weight gradients to the contraction (``structured.split_fn``'s
        ``defer``), which stores less and so may need fewer chunks, and takes it when that is estimated to cost
        less: each chunk's backward passes, one per sample and output (≈ 2 forward passes) down to its first layer
        (``structured.backward_share``), plus the weight gradients formed per tile (``structured.deferral_macs``)."""
        samples = n1 if same else n1 + n2
        structured_path = chosen is Implementation.STRUCTURED

        def jacobian_bytes(chunk_parts):  # a sliced leaf's whole gradient is formed before it is sliced
            sliced = {i for i, start, stop in chunk_parts if stop - start < self._leaf_sizes[i]}
            return jacobian.split_bytes(self._profile, n1, n2, num_params=sum(stop - start for _, start, stop in
                                        chunk_parts), sliced_params=sum(self._leaf_sizes[i] for i in sliced))

        def sizes(chunk, defer):
            if structured_path:
                return structured.split_bytes(self._profile, n1, n2, self._cover, same=same, chunk=chunk, defer=defer)
            return jacobian_bytes([parts[u] for u in chunk])

        def fitted(stored, build_bytes, contract_bytes):  # at most half the budget stored, so that features are
            if samples * stored > budget // 2:            # built many samples at a time
                return None
            return plan_split(n1, n2, samples * stored, build_bytes, self._with_blocks(contract_bytes), budget,
                              devices)

        @functools.cache  # asked once while the chunks are cut and again for the chunks kept
        def planned(chunk, defer):
            return fitted(*sizes(chunk, defer))

        def chunks(defer):
            plan = plan_chunks(count, lambda chunk: planned(chunk, defer) is not None)
            return None if plan is None else [(chunk, *planned(chunk, defer)) for chunk in plan]

        def estimated_flops(plan, defer):  # what differs between the plans of structured's split path
            profile = self._profile
            passes = samples * profile.kept * profile.traced * 2 * profile.forward_flops
            return sum(passes * structured.backward_share(self._cover, chunk) + 2 * (structured.deferral_macs(
                profile, n1, n2, self._cover, tiles, same=same, chunk=chunk) if defer else 0)
                for chunk, _, tiles in plan)

        def split(chunk, defer):
            if structured_path:
                return structured.split_fn(f, params, x, n1, n2, same=same, cover=self._cover, chunk=chunk,
                                           defer=defer)
            return jacobian.split_fn(f, params, groups=self._groups, parts=[parts[u] for u in chunk])

        if structured_path and not self._cover.layers:
            return None  # structured is then jacobian, whose tiles it takes
        if structured_path:
            count = structured.units(self._cover)
        else:  # leaves in the order the model reads them, so that the backward passes of a chunk of late layers stop
            # early; a leaf whose Jacobians alone do not fit is cut into slices of its parameters
            order = self._cover.plan.read_order
            ordered = plan_parts([self._leaf_sizes[i] for i in order],
                                 lambda u, size: fitted(*jacobian_bytes([(order[u], 0, size)])) is not None)
            if ordered is None:
                return None
            parts = [(order[u], start, stop) for u, start, stop in ordered]
            for i in sorted({i for i, start, stop in parts if stop - start < self._leaf_sizes[i]}):
                logger.debug("jacobian: leaf %d (%d parameters) cut into %d slices", i, self._leaf_sizes[i],
                             sum(part[0] == i for part in parts))
            count = len(parts)
        plans = {defer: plan for defer in ((False, True) if structured_path else (False,))
                 if (plan := chunks(defer)) is not None}
        if not plans:
            return None
        defer = min(plans, key=lambda defer: estimated_flops(plans[defer], defer)) if structured_path else False
        return [(*split(chunk, defer), feature_tile, tiles) for chunk, feature_tile, tiles in plans[defer]]


# equal estimates go to the first: structured does the Jacobian's work in larger products (each sample's layer inputs
# serve all its outputs' cotangents), measured faster on CPU
_TIES = (Implementation.STRUCTURED, Implementation.JACOBIAN, Implementation.NTVP)


def _choose(costs: _Costs, n1: int, n2: int, candidates: Sequence[Implementation]) -> Implementation:
    estimates = {impl: costs.flops[impl](n1, n2) for impl in candidates}
    choice = min(sorted(estimates, key=_TIES.index), key=estimates.get)
    logger.debug("auto implementation: %s (estimated FLOPs %s)", choice.value,
                 {impl.value: f"{cost:.3g}" for impl, cost in estimates.items()})
    return choice


def _nan_if_nonfinite(kernels: tuple[jax.Array, ...], warn: bool) -> tuple[jax.Array, ...]:
    """Replace non-finite entries by NaN; with ``warn``, also warn (once for all groups) at run time (works under
    ``jit``)."""
    finite = [jnp.isfinite(kernel) for kernel in kernels]
    if warn:
        jax.debug.callback(_warn_nonfinite, sum(jnp.sum(~f) for f in finite), sum(k.size for k in kernels))
    return tuple(jnp.where(f, kernel, jnp.nan) for f, kernel in zip(finite, kernels, strict=True))


def _warn_nonfinite(count, size) -> None:
    if int(count):
        warnings.warn(
            f"the NTK has {int(count)} of {int(size)} non-finite entries, returned as NaN: the model's outputs "
            "or gradients are NaN or overflow at these parameters",
            RuntimeWarning,
            stacklevel=2,
        )


def ntk_fn(
    apply_fn: ApplyFn,
    *,
    trace_axes: Sequence[int] = (-1,),
    implementation: str | Implementation = "auto",
    diagonal: bool = False,
    groups: GroupSpec | None = None,
    memory_budget: int | None = None,
    precision: str | None = "highest",
    warn: bool = True,
    gather: bool = True,
) -> Callable[..., Float[Array, "N1 ..."] | dict[str, Float[Array, "N1 ..."]]]:
    """Empirical neural tangent kernel of ``apply_fn`` with respect to all of ``params``, whole or per parameter group.

    .. math::
       Θ_{ij} = \\sum_{k ∈ \\text{traced}} \\Big\\langle \\frac{∂f_k(x_i)}{∂θ}, \\frac{∂f_k(x_j)}{∂θ} \\Big\\rangle
       = \\sum_g Θ^{(g)}_{ij}, \\qquad Θ^{(g)}_{ij} = \\sum_{k ∈ \\text{traced}} \\sum_{θ ∈ g}
       \\frac{∂f_k(x_i)}{∂θ} \\frac{∂f_k(x_j)}{∂θ}

    Traced output axes are *summed* (neural-tangents averages them: its kernel is ours divided by
    the traced size).

    Args:
      apply_fn: ``apply_fn(params, x) -> (N, *out)``, one array; samples must not interact (put
        BatchNorm in eval mode). See :func:`ntkcv.from_linen` and :func:`ntkcv.from_nnx` for Flax models.
      trace_axes: output axes to sum over (axis 0 is the batch); ``()`` keeps all outputs.
      implementation: ``"jacobian"``, ``"ntvp"``, ``"structured"`` or ``"auto"`` (see :class:`Implementation`).
      diagonal: return only ``Θ(x_i, x_i)``: ``(N,)`` traced, ``(N, k, k, …)`` otherwise; never builds
        the ``N × N`` kernel.
      groups: ``None`` for Θ; ``"layers"`` or a mapping ``{name: pattern(s)}`` for the kernels ``Θ^{(g)}`` of
        parameter groups (one per layer, or by ``fnmatch`` patterns on ``/``-joined leaf paths; every leaf in
        exactly one group: see :func:`ntkcv.parameter_groups`), computed in one pass; not with ``"ntvp"``.
      memory_budget: bytes the computation's working memory may take on each device (default: half the device
        memory, a quarter of host RAM on CPU); larger probe sets are computed in tiles. It bounds the compiled
        program's buffers (ResNet-18, N = 256 on CPU: 5.73 GB by XLA's memory analysis within 5.89 GB), not the
        process: its own memory comes on top (there, peak RSS 7.5 GB).
      precision: matmul precision (``"highest"``: full float32 even where the default is TF32; pass
        ``"default"`` or ``"tensorfloat32"`` to trade accuracy for speed).
      warn: warn at run time when the kernel has non-finite entries (through a host callback). With
        ``False`` the compiled program has no host callback, so JAX's persistent compilation cache can
        store it; the caller then checks the result (non-finite entries are NaN either way).
      gather: return the kernel replicated on every device. ``False`` keeps its rows (``N₁``, a multiple of the
        number of devices) split over the devices: under ``jax.distributed`` a global ``jax.Array`` of which each
        process holds some rows (``kernel.addressable_shards``), for computations that every process runs, such as
        products with the kernel.

    Returns:
      ``kernel_fn(params, x1, x2=None)``, jitted, for probe inputs ``x1`` ``(N₁, …)`` and ``x2`` ``(N₂, …)``
      (``None``: ``x1`` again), giving ``(N₁, N₂)`` for fully traced outputs or ``(N₁, N₂, k₁, k₁, k₂, k₂, …)``
      (neural-tangents' order: each kept output axis twice) otherwise; see
      :func:`ntkcv.flatten_kernel` for ``(N₁·K, N₂·K)``. With ``diagonal=True``: ``kernel_fn(params, x)``.
      With ``groups``: ``{group name: kernel}`` of such kernels, summing to Θ (keys sorted, as ``jit`` returns dicts).

    Example:
      >>> import jax, jax.numpy as jnp, ntkcv
      >>> apply_fn = lambda p, x: jnp.tanh(x @ p["w"]) @ p["v"]
      >>> params = {"w": jnp.ones((3, 4)), "v": jnp.ones((4, 2))}
      >>> ntkcv.ntk_fn(apply_fn)(params, jnp.ones((5, 3))).shape
      (5, 5)
      >>> {g: k.shape for g, k in ntkcv.ntk_fn(apply_fn, groups="layers")(params, jnp.ones((5, 3))).items()}
      {'v': (5, 5), 'w': (5, 5)}
    """
    try:
        impl = Implementation(implementation)
    except ValueError:
        allowed = ", ".join(repr(i.value) for i in Implementation)
        raise ValueError(f"implementation must be one of {allowed}, got {implementation!r}") from None
    if not callable(apply_fn):
        raise TypeError(f"apply_fn must be callable as apply_fn(params, x), got {type(apply_fn).__name__}")
    if isinstance(trace_axes, int) or not all(isinstance(a, int) for a in trace_axes):
        raise TypeError(f"trace_axes must be a sequence of ints, got {trace_axes!r}")
    trace_axes = tuple(trace_axes)
    if memory_budget is not None and (not isinstance(memory_budget, int) or memory_budget <= 0):
        raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget!r}")
    if groups is not None:
        groups = check_groups(groups)
        if impl not in (*_GROUPED, Implementation.AUTO):
            *others, last = (repr(i.value) for i in (*_GROUPED, Implementation.AUTO))
            raise ValueError(f"implementation {impl.value!r} gives only the whole kernel; with groups use "
                             f"{', '.join(others)} or {last}")

    def prepare(params, x1, x2):
        num_params = check_params(params)
        check_inputs(x1, x2)
        names, leaf_groups = (None, None) if groups is None else partition(params, groups)
        # shapes only, so outside the precision context: a caller's own eval_shape of apply_fn is reused, not redone
        layout = output_layout(apply_fn, params, x1, trace_axes)
        f = canonical_fn(apply_fn, layout)
        with jax.default_matmul_precision(precision):
            profile = profile_model(f, params, x1, layout.kept_size, layout.traced_size, num_params)
            costs = _Costs(f, params, x1, profile, leaf_groups)
        n1 = x1.shape[0]
        n2 = n1 if x2 is None else x2.shape[0]
        candidates = tuple(_MODULES) if groups is None else _GROUPED
        chosen = _choose(costs, n1, n2, candidates) if impl is Implementation.AUTO else impl
        budget = default_memory_budget() if memory_budget is None else memory_budget
        return names, layout, f, costs, chosen, budget

    def tiled(f, params, x1, x2, costs, chosen, budget):
        """One tile if it fits; else, for ``structured`` and ``jacobian``, each sample's features built once (per
        chunk of leaves) and contracted in tiles (:meth:`_Costs.splits`); else tiles that each build their own."""
        n1, devices = x1.shape[0], num_devices()
        n2 = n1 if x2 is None else x2.shape[0]
        module, tile_bytes, options = _MODULES[chosen], costs.tile_bytes[chosen], costs.options[chosen]
        if chosen in _GROUPED and tile_bytes(-(-n1 // devices), n2) > budget:
            chunks = costs.splits(chosen, f, params, x1, n1, n2, same=x2 is None, budget=budget, devices=devices)
            if chunks is not None:
                for i, (*_, feature_tile, tiles) in enumerate(chunks):
                    logger.debug("%s: features in tiles of %d, contraction in %s tiles (chunk %d of %d)",
                                 chosen.value, feature_tile, tiles, i + 1, len(chunks))
                return tiled_split_chunks(chunks, x1, x2)
        tiles = plan_tiles(n1, n2, tile_bytes, budget, devices)
        return tiled_kernel(lambda a, b: module.kernel_tile(f, params, a, b, **options), x1, x2, tiles)

    def finish(kernels, names, unflatten):
        """The whole kernel, or the groups' kernels by name, laid out as ``gather`` asks; non-finite entries as NaN."""
        kernels = laid_out(_nan_if_nonfinite(tuple(map(unflatten, kernels)), warn), gather=gather)
        return kernels[0] if names is None else dict(zip(names, kernels, strict=True))

    def kernel_fn(
        params: PyTree, x1: Shaped[Array, "N1 ..."], x2: Shaped[Array, "N2 ..."] | None = None
    ) -> Float[Array, "N1 N2 *out_pairs"] | dict[str, Float[Array, "N1 N2 *out_pairs"]]:
        names, layout, f, costs, chosen, budget = prepare(params, x1, x2)
        with jax.default_matmul_precision(precision):
            return finish(tiled(f, params, x1, x2, costs, chosen, budget), names, layout.unflatten_kernel)

    def diagonal_fn(
        params: PyTree, x: Shaped[Array, "N ..."]
    ) -> Float[Array, "N ..."] | dict[str, Float[Array, "N ..."]]:
        names, layout, f, costs, chosen, budget = prepare(params, x, None)
        with jax.default_matmul_precision(precision):
            tile_bytes, module, options = costs.tile_bytes[chosen], _MODULES[chosen], costs.options[chosen]
            tile, _ = plan_tiles(x.shape[0], 1, lambda b1, _: tile_bytes(b1, 1), budget, num_devices())
            diag = tiled_per_sample(lambda t: module.diagonal_tile(f, params, t, **options), x, tile)
            return finish(diag, names, layout.unflatten_diagonal)

    # arguments replicated on every device; under jax.distributed, a gathered kernel returned as each process's copy;
    # called outside jit, compiled with the options that run NTK programs faster (ntk_compile_options)
    fn = diagonal_fn if diagonal else kernel_fn
    return OnAllDevices(jax.jit(fn), gather=gather, top_level=jax.jit(fn, compiler_options=ntk_compile_options()))
