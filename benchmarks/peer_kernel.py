"""neural-tangents 0.6.5's empirical NTK of a reference model, for ``benchmarks.ntk_speed``.

The peer's own runner (``../shared/peer/nt_kernel.py``) knows only its MLP and CNN and differentiates every
variable it is given. This one takes any model of ``benchmarks/reference_models.py`` (built by the same code on
both sides, so parameter names match) and differentiates ``variables['params']`` only, holding the other
collections fixed (BatchNorm's ``batch_stats``, eval mode) as :func:`ntkcv.from_linen` does. It runs in the peer's
environment (``../shared/peer/setup.sh``: jax 0.4.25, flax 0.8.2, neural-tangents 0.6.5), one implementation per
process, through ``ntk_speed``'s child mode::

    $PEER_PYTHON -m benchmarks.ntk_speed --child --side nt --implementation 3 --spec spec.json --inputs x.npz \
        --params p.npz --trace-axes=-1 --reps 3 --out kernel.npy

neural-tangents *averages* over the traced output axes: its kernel is ntkcv's divided by their size.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax


def nt_kernel_fn(module: Any, variables: Mapping[str, Any], *, trace_axes: Sequence[int],
                 implementation: int) -> Callable[[Any, jax.Array], jax.Array]:
    """``kernel_fn(params, x)``: neural-tangents' jitted ``empirical_ntk_fn`` (``vmap_axes=0``) of the flax
    ``module`` in ``variables``, with respect to ``params`` (its ``'params'`` collection)."""
    import neural_tangents as nt

    fixed = {name: value for name, value in variables.items() if name != "params"}

    def apply_fn(params, x):
        return module.apply({"params": params, **fixed}, x)

    kernel = nt.empirical_ntk_fn(apply_fn, trace_axes=tuple(trace_axes), vmap_axes=0, implementation=implementation)
    return jax.jit(lambda params, x: kernel(x, None, params))
