"""The devices that compute the NTK, and how its inputs and results lie on them, in one process or several.

In one process the work is spread over its local devices. Under ``jax.distributed`` with several processes it is
spread over all processes' devices (``jax.devices()``): every process runs the same program on the same parameters
and probe inputs (SPMD), replicated on every device, each device computes its share of the rows, and the result comes
back replicated on every device or, on request, row-sharded over all of them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "devices"


def compute_devices() -> list[jax.Device]:
    """All processes' devices when ``jax.distributed`` runs several processes, else this process's devices."""
    return jax.devices() if jax.process_count() > 1 else jax.local_devices()


def num_devices() -> int:
    """How many devices share the work (see :func:`compute_devices`)."""
    return len(compute_devices())


@functools.cache
def _mesh(devices: tuple[jax.Device, ...]) -> Mesh:
    return Mesh(np.array(devices), (AXIS,))


def device_mesh() -> Mesh:
    """A one-axis mesh (:data:`AXIS`) over :func:`compute_devices`."""
    return _mesh(tuple(compute_devices()))


def on_devices(fn: Callable, sharded: Any, *shared: Any) -> Any:
    """``fn(sharded, *shared)`` with the leaves of ``sharded`` split along axis 0 over the devices (their length a
    multiple of the number of devices), those of ``shared`` whole on every device, and the result's leaves joined
    along axis 0; ``fn`` may sum over the devices with ``jax.lax.psum(…, AXIS)``."""
    if num_devices() == 1:
        return fn(sharded, *shared)
    sharded_fn = jax.shard_map(fn, mesh=device_mesh(), in_specs=(PartitionSpec(AXIS),) + (PartitionSpec(),) *
                               len(shared), out_specs=PartitionSpec(AXIS), check_vma=False)
    return sharded_fn(sharded, *shared)


def laid_out(tree: Any, *, gather: bool) -> Any:
    """``tree``'s leaves replicated on every device (``gather``) or split along axis 0 over the devices (traced
    code, inside ``jit``); unchanged on one device."""
    devices = num_devices()
    if devices == 1:
        return tree
    rows = {leaf.shape[0] for leaf in jax.tree_util.tree_leaves(tree)}
    if not gather and any(n % devices for n in rows):
        raise ValueError(f"gather=False splits the rows over the {devices} devices, so their number must be a "
                         f"multiple of {devices}; got {min(rows)} rows")
    sharding = NamedSharding(device_mesh(), PartitionSpec() if gather else PartitionSpec(AXIS))
    return jax.lax.with_sharding_constraint(tree, sharding)


def replicated(tree: Any) -> Any:
    """``tree``'s concrete leaves replicated on every device, so that programs over all devices accept them: with
    several processes, process-local leaves (NumPy arrays, single-process ``jax.Array``s: the same values on every
    process) become global arrays; global arrays, tracers and everything on one device are left as they are."""
    if num_devices() == 1:
        return tree
    mesh = device_mesh()

    def place(leaf):
        if isinstance(leaf, jax.core.Tracer):
            return leaf
        if jax.process_count() > 1:
            return multihost_utils.host_local_array_to_global_array(leaf, mesh, PartitionSpec())
        return jax.device_put(leaf, NamedSharding(mesh, PartitionSpec()))

    return jax.tree_util.tree_map(place, tree)


class OnAllDevices:
    """``fn`` (a ``jax.jit``) called with its concrete arguments :func:`replicated`; with several processes and
    ``gather``, each leaf of the (replicated) result is this process's own, fully addressable copy. ``top_level``: the
    same function jitted with its own compile options (which JAX accepts only on a ``jit`` that no other encloses),
    called instead of ``fn`` when no argument is traced. Other attributes (``lower``, ``trace``) are those of
    ``top_level`` (default ``fn``)."""

    def __init__(self, fn: Callable, *, gather: bool, top_level: Callable | None = None):
        self._fn, self._gather, self._top_level = fn, gather, fn if top_level is None else top_level
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        traced = any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves((args, kwargs)))
        results = (self._fn if traced else self._top_level)(*replicated(args), **replicated(kwargs))
        if not self._gather or jax.process_count() == 1:
            return results
        return jax.tree_util.tree_map(
            lambda leaf: leaf if isinstance(leaf, jax.core.Tracer) else leaf.addressable_data(0), results)

    def __getattr__(self, name: str) -> Any:  # names the wrapper lacks
        if name in ("_fn", "_top_level"):  # not set yet (a copy being made)
            raise AttributeError(name)
        return getattr(self._top_level, name)
