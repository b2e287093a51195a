"""The public factory :func:`ntk_fn` and the choice between implementations."""

from __future__ import annotations

import enum
import functools
import logging
import warnings
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp

from ntkcv.ntk import jacobian, ntvp, structured
from ntkcv.ntk.layout import canonical_fn, output_layout
from ntkcv.ntk.profile import ModelProfile, profile_model
from ntkcv.ntk.tiling import (
    default_memory_budget,
    plan_split,
    plan_tiles,
    tiled_kernel,
    tiled_per_sample,
    tiled_split_kernel,
)
from ntkcv.ntk.validate import check_inputs, check_params

logger = logging.getLogger("ntkcv.ntk")


class Implementation(enum.StrEnum):
    """How the empirical NTK is computed. All are exact to rounding; they differ in cost.

    - ``JACOBIAN``: per-sample Jacobians ``J`` (reverse mode), then ``Θ = Σ_leaves J₁J₂ᵀ``. Cost
      ``(N₁+N₂)·O·R`` backward passes and an ``N₁N₂O²RP`` contraction; memory ``(N₁+N₂)·O·R·P``. Best for
      small ``P`` with expensive forward passes (weight sharing, convolutions).
    - ``NTVP``: NTK-vector products: every per-sample gradient of ``x₂`` pushed forward through the
      model at ``x₁``. Cost ``N₂·O·R`` backward plus ``N₁N₂·O·R`` forward passes, no contraction over
      ``P``. Best for full (untraced) kernels of wide dense models.
    - ``STRUCTURED``: layer-factorised: each Dense/DenseGeneral/Conv/Embed layer's share of Θ from its
      inputs and per-output cotangents, in the cheaper of two contraction orders; other leaves take
      the Jacobian contraction. Never builds a Jacobian of a covered layer; the fast path for monitoring.
    - ``AUTO``: the implementation with the smallest FLOP estimate for these shapes, from XLA's cost
      analysis of one forward pass and the layers ``structured`` covers (see each module's ``flops``);
      ties go to ``jacobian``.
    """

    JACOBIAN = "jacobian"
    NTVP = "ntvp"
    STRUCTURED = "structured"
    AUTO = "auto"


_MODULES: dict[Implementation, ModuleType] = {
    Implementation.JACOBIAN: jacobian, Implementation.NTVP: ntvp, Implementation.STRUCTURED: structured}


class _Costs:
    """Each implementation's ``flops(n1, n2)`` and ``tile_bytes(b1, b2)`` for one model and input shape, and the
    keyword arguments its tile functions take (``structured``: the coverage, whose trace of the model they reuse)."""

    def __init__(self, f, params, x, profile: ModelProfile):
        self.options = {impl: {} for impl in _MODULES}
        self.options[Implementation.STRUCTURED] = {"cover": structured.coverage(f, params, x)}
        self.flops = {impl: functools.partial(module.flops, profile, **self.options[impl])
                      for impl, module in _MODULES.items()}
        self.tile_bytes = {impl: functools.partial(module.tile_bytes, profile, **self.options[impl])
                           for impl, module in _MODULES.items()}
        self.split_bytes = functools.partial(structured.split_bytes, profile,
                                             **self.options[Implementation.STRUCTURED])


def _choose(costs: _Costs, n1: int, n2: int) -> Implementation:
    estimates = {impl: flops(n1, n2) for impl, flops in costs.flops.items()}
    choice = min(estimates, key=estimates.get)
    logger.debug("auto implementation: %s (estimated FLOPs %s)", choice.value,
                 {impl.value: f"{cost:.3g}" for impl, cost in estimates.items()})
    return choice


def _nan_if_nonfinite(kernel: jax.Array, warn: bool) -> jax.Array:
    """Replace non-finite entries by NaN; with ``warn``, also warn at run time (works under ``jit``)."""
    finite = jnp.isfinite(kernel)
    if warn:
        jax.debug.callback(_warn_nonfinite, jnp.sum(~finite), kernel.size)
    return jnp.where(finite, kernel, jnp.nan)


def _warn_nonfinite(count, size) -> None:
    if int(count):
        warnings.warn(
            f"the NTK has {int(count)} of {int(size)} non-finite entries, returned as NaN: the model's outputs "
            "or gradients are NaN or overflow at these parameters",
            RuntimeWarning,
            stacklevel=2,
        )


def ntk_fn(
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    *,
    trace_axes: Sequence[int] = (-1,),
    implementation: str | Implementation = "auto",
    diagonal: bool = False,
    memory_budget: int | None = None,
    precision: str | None = "highest",
    warn: bool = True,
) -> Callable[..., jax.Array]:
    """Empirical neural tangent kernel of ``apply_fn`` with respect to all of ``params``.

    .. math::
       Θ_{ij} = \\sum_{k ∈ \\text{traced}} \\Big\\langle \\frac{∂f_k(x_i)}{∂θ}, \\frac{∂f_k(x_j)}{∂θ} \\Big\\rangle

    Traced output axes are *summed* (neural-tangents averages them: its kernel is ours divided by
    the traced size).

    Args:
      apply_fn: ``apply_fn(params, x) -> (N, *out)``, one array; samples must not interact (put
        BatchNorm in eval mode). See :func:`ntkcv.from_linen` and :func:`ntkcv.from_nnx` for Flax models.
      trace_axes: output axes to sum over (axis 0 is the batch); ``()`` keeps all outputs.
      implementation: ``"jacobian"``, ``"ntvp"``, ``"structured"`` or ``"auto"`` (see :class:`Implementation`).
      diagonal: return only ``Θ(x_i, x_i)``: ``(N,)`` traced, ``(N, k, k, …)`` otherwise; never builds
        the ``N × N`` kernel.
      memory_budget: bytes one tile may use (default: half the device memory, a quarter of host RAM
        on CPU); larger probe sets are computed in tiles.
      precision: matmul precision (``"highest"``: full float32 even where the default is TF32; pass
        ``"default"`` or ``"tensorfloat32"`` to trade accuracy for speed).
      warn: warn at run time when the kernel has non-finite entries (through a host callback). With
        ``False`` the compiled program has no host callback, so JAX's persistent compilation cache can
        store it; the caller then checks the result (non-finite entries are NaN either way).

    Returns:
      ``kernel_fn(params, x1, x2=None)``, jitted, giving ``(N₁, N₂)`` for fully traced outputs or
      ``(N₁, N₂, k₁, k₁, k₂, k₂, …)`` (neural-tangents' order) otherwise; see
      :func:`ntkcv.flatten_kernel` for ``(N₁·K, N₂·K)``. With ``diagonal=True``: ``kernel_fn(params, x)``.

    Example:
      >>> import jax, jax.numpy as jnp, ntkcv
      >>> apply_fn = lambda p, x: jnp.tanh(x @ p["w"]) @ p["v"]
      >>> params = {"w": jnp.ones((3, 4)), "v": jnp.ones((4, 2))}
      >>> ntkcv.ntk_fn(apply_fn)(params, jnp.ones((5, 3))).shape
      (5, 5)
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

    def prepare(params, x1, x2):
        num_params = check_params(params)
        check_inputs(x1, x2)
        # shapes only, so outside the precision context: a caller's own eval_shape of apply_fn is reused, not redone
        layout = output_layout(apply_fn, params, x1, trace_axes)
        f = canonical_fn(apply_fn, layout)
        with jax.default_matmul_precision(precision):
            profile = profile_model(f, params, x1, layout.kept_size, layout.traced_size, num_params)
            costs = _Costs(f, params, x1, profile)
        n1 = x1.shape[0]
        n2 = n1 if x2 is None else x2.shape[0]
        chosen = _choose(costs, n1, n2) if impl is Implementation.AUTO else impl
        budget = default_memory_budget() if memory_budget is None else memory_budget
        return layout, f, costs, chosen, budget

    def tiled(f, params, x1, x2, costs, chosen, budget):
        """One tile if it fits; else, for ``structured``, each sample's features built once and contracted in
        tiles (when all samples' features fit in the budget beside one tile's work); else tiles that each build
        their own."""
        n1, num_devices = x1.shape[0], len(jax.local_devices())
        n2 = n1 if x2 is None else x2.shape[0]
        module, tile_bytes, options = _MODULES[chosen], costs.tile_bytes[chosen], costs.options[chosen]
        if chosen is Implementation.STRUCTURED and tile_bytes(-(-n1 // num_devices), n2) > budget:
            stored, build_bytes, contract_bytes = costs.split_bytes(n1, n2, same=x2 is None)
            samples = n1 if x2 is None else n1 + n2
            planned = plan_split(n1, n2, samples * stored, build_bytes, contract_bytes, budget, num_devices)
            split = None if planned is None else structured.split_fn(f, params, x1, n1, n2, same=x2 is None,
                                                                     **options)
            if split is not None:
                logger.debug("structured: features in tiles of %d, contraction in %s tiles", *planned)
                return tiled_split_kernel(*split, x1, x2, *planned)
        tiles = plan_tiles(n1, n2, tile_bytes, budget, num_devices)
        return tiled_kernel(lambda a, b: module.kernel_tile(f, params, a, b, **options), x1, x2, tiles)

    @jax.jit
    def kernel_fn(params: Any, x1: jax.Array, x2: jax.Array | None = None) -> jax.Array:
        layout, f, costs, chosen, budget = prepare(params, x1, x2)
        with jax.default_matmul_precision(precision):
            kernel = tiled(f, params, x1, x2, costs, chosen, budget)
            return _nan_if_nonfinite(layout.unflatten_kernel(kernel), warn)

    @jax.jit
    def diagonal_fn(params: Any, x: jax.Array) -> jax.Array:
        layout, f, costs, chosen, budget = prepare(params, x, None)
        with jax.default_matmul_precision(precision):
            tile_bytes, module, options = costs.tile_bytes[chosen], _MODULES[chosen], costs.options[chosen]
            tile, _ = plan_tiles(x.shape[0], 1, lambda b1, _: tile_bytes(b1, 1), budget, len(jax.local_devices()))
            diag = tiled_per_sample(lambda t: module.diagonal_tile(f, params, t, **options), x, tile)
            return _nan_if_nonfinite(layout.unflatten_diagonal(diag), warn)

    return diagonal_fn if diagonal else kernel_fn
