"""Tiles over ``(x₁, x₂)`` within a memory budget, spread over all local devices.

The kernel is computed block by block: ``x₁`` is cut into row tiles of ``b₁`` samples and ``x₂`` into
column tiles of ``b₂`` (the last tile padded by repeating a sample, the padding cut from the result,
so ``N`` need not divide). Row tiles are sharded over the local devices with ``jax.shard_map``; each
device loops over its row tiles and all column tiles with ``lax.map``, so peak memory is that of one
tile per device.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

TileBytesFn = Callable[[int, int], int]  # (b1, b2) -> estimated peak bytes of one tile
_AXIS = "tiles"


def default_memory_budget() -> int:
    """Half the memory of the first local device, or a quarter of host RAM when JAX cannot tell."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"]) // 2
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):
        return 2**31


def plan_tiles(n1: int, n2: int, tile_bytes: TileBytesFn, memory_budget: int, num_devices: int) -> tuple[int, int]:
    """Largest tile sizes ``(b₁, b₂)`` whose estimated memory fits ``memory_budget`` bytes."""
    rows = math.ceil(n1 / num_devices)
    if tile_bytes(rows, n2) <= memory_budget:
        return rows, n2
    if tile_bytes(1, 1) > memory_budget:
        raise ValueError(
            f"memory_budget of {memory_budget:,} bytes is too small for one tile: a single pair of samples "
            f"needs about {tile_bytes(1, 1):,} bytes with this model and implementation"
        )
    lo, hi = 1, max(rows, n2)
    while lo < hi:  # largest square tile that fits
        mid = (lo + hi + 1) // 2
        if tile_bytes(min(mid, rows), min(mid, n2)) <= memory_budget:
            lo = mid
        else:
            hi = mid - 1
    return _balanced(rows, lo), _balanced(n2, lo)


def _balanced(n: int, tile: int) -> int:
    """The smallest tile that covers ``n`` in as few tiles of at most ``tile`` as possible (least padding)."""
    return math.ceil(n / math.ceil(n / tile))


def _split(x: jax.Array, tile: int, multiple: int = 1) -> jax.Array:
    """``(N, …) -> (T, tile, …)`` with ``T`` a multiple of ``multiple``, padding by repeating sample 0."""
    count = math.ceil(x.shape[0] / tile)
    count = math.ceil(count / multiple) * multiple
    pad = count * tile - x.shape[0]
    if pad:
        x = jnp.concatenate([x, jnp.broadcast_to(x[:1], (pad,) + x.shape[1:])])
    return x.reshape((count, tile) + x.shape[1:])


def _on_devices(fn: Callable, tiles: jax.Array, *replicated) -> jax.Array:
    """``fn(tiles, *replicated)`` with ``tiles`` sharded along axis 0 over the local devices."""
    devices = jax.local_devices()
    if len(devices) == 1:
        return fn(tiles, *replicated)
    mesh = Mesh(np.array(devices), (_AXIS,))
    sharded = jax.shard_map(
        fn,
        mesh=mesh,
        in_specs=(PartitionSpec(_AXIS),) + (PartitionSpec(),) * len(replicated),
        out_specs=PartitionSpec(_AXIS),
        check_vma=False,
    )
    return sharded(tiles, *replicated)


def tiled_kernel(
    tile_fn: Callable[[jax.Array, jax.Array | None], jax.Array],
    x1: jax.Array,
    x2: jax.Array | None,
    tiles: tuple[int, int],
) -> jax.Array:
    """Assemble ``(N₁, N₂, O, O)`` from ``tile_fn(x1_tile, x2_tile) -> (b₁, b₂, O, O)``.

    ``x2=None`` means ``x2 = x1``; when one tile covers everything ``tile_fn`` gets ``None`` and may
    reuse work.
    """
    b1, b2 = tiles
    n1 = x1.shape[0]
    n2 = n1 if x2 is None else x2.shape[0]
    num_devices = len(jax.local_devices())
    if num_devices == 1 and (b1, b2) == (n1, n2):
        return tile_fn(x1, x2)
    columns = _split(x1 if x2 is None else x2, b2)
    rows = _split(x1, b1, num_devices)

    def local_rows(row_tiles, column_tiles):
        return jax.lax.map(lambda r: jax.lax.map(lambda c: tile_fn(r, c), column_tiles), row_tiles)

    blocks = _on_devices(local_rows, rows, columns)  # (T1, T2, b1, b2, O, O)
    t1, t2 = blocks.shape[:2]
    kernel = blocks.transpose(0, 2, 1, 3, 4, 5).reshape((t1 * b1, t2 * b2) + blocks.shape[4:])
    return kernel[:n1, :n2]


def tiled_diagonal(diag_fn: Callable[[jax.Array], jax.Array], x: jax.Array, tile: int) -> jax.Array:
    """Assemble ``(N, O, O)`` from ``diag_fn(x_tile) -> (b, O, O)``."""
    n = x.shape[0]
    if len(jax.local_devices()) == 1 and tile == n:
        return diag_fn(x)
    blocks = _on_devices(lambda t: jax.lax.map(diag_fn, t), _split(x, tile, len(jax.local_devices())))
    return blocks.reshape((-1,) + blocks.shape[2:])[:n]
