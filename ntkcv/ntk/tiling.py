"""Tiles over ``(x₁, x₂)`` within a memory budget, spread over all devices (all processes' under ``jax.distributed``).

The kernel is computed block by block: ``x₁`` is cut into row tiles of ``b₁`` samples and ``x₂`` into
column tiles of ``b₂``, so peak memory is that of one tile per device. On one device each block is written into the
kernel in place, the last tile ending at ``N`` (overlapping the one before it), and a kernel of ``x₁`` with itself
computes only the tiles on and above the diagonal. On several, row tiles are sharded over the devices
(:mod:`ntkcv.ntk.devices`) with ``jax.shard_map`` (the last tile padded by repeating a sample, the padding cut from
the result, so ``N`` need not divide) and each device loops over its row tiles and all column tiles with
``lax.map``.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from ntkcv.ntk.devices import num_devices, on_devices

TileBytesFn = Callable[[int, int], int]  # (b1, b2) -> estimated peak bytes of one tile

# loops over at most this many tiles (on one device) are unrolled: XLA's CPU runtime ran the same features
# 2.5 times slower inside a while loop than outside one (benchmarks/NOTES.md, "Structured path at ResNet-18 scale")
_UNROLLED = 8


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
    side = _largest(lambda b: tile_bytes(min(b, rows), min(b, n2)) <= memory_budget, max(rows, n2))
    return _balanced(rows, side), _balanced(n2, side)


def _largest(fits: Callable[[int], bool], upper: int) -> int:
    """The largest ``b ≤ upper`` with ``fits(b)`` (bisection; ``fits`` is monotone and ``fits(1)`` holds)."""
    lo, hi = 1, upper
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def _balanced(n: int, tile: int) -> int:
    """The smallest tile that covers ``n`` in as few tiles of at most ``tile`` as possible (least padding)."""
    return math.ceil(n / math.ceil(n / tile))


def _size(tree) -> int:
    return jax.tree_util.tree_leaves(tree)[0].shape[0]


def _split(tree, tile: int, multiple: int = 1):
    """Leaves ``(N, …) -> (T, tile, …)`` with ``T`` a multiple of ``multiple``, padding by repeating sample 0."""
    count = math.ceil(_size(tree) / tile)
    count = math.ceil(count / multiple) * multiple
    pad = count * tile - _size(tree)

    def leaf(x):
        if pad:
            x = jnp.concatenate([x, jnp.broadcast_to(x[:1], (pad,) + x.shape[1:])])
        return x.reshape((count, tile) + x.shape[1:])

    return jax.tree_util.tree_map(leaf, tree)


def _unsplit(tree, n: int):
    """``(T, tile, …) -> (N, …)``, the padding cut."""
    return jax.tree_util.tree_map(lambda x: x.reshape((-1,) + x.shape[2:])[:n], tree)


def tiled_kernel(tile_fn: Callable[[jax.Array, jax.Array | None], Any], x1: jax.Array, x2: jax.Array | None,
                 tiles: tuple[int, int]) -> Any:
    """Assemble kernels ``(N₁, N₂, …)`` from ``tile_fn(x1_tile, x2_tile)``, a pytree of ``(b₁, b₂, O, O)`` blocks
    (one per parameter group).

    ``x2=None`` means ``x2 = x1``; ``tile_fn`` may get ``None`` for a tile of ``x1`` against itself and reuse work.
    On one device the tiles are written in place (:func:`_tiles_in_place`); on several, each device loops over its
    row tiles.
    """
    b1, b2 = tiles
    n1 = _size(x1)
    n2 = n1 if x2 is None else _size(x2)
    devices = num_devices()
    if devices == 1:
        return tile_fn(x1, x2) if (b1, b2) == (n1, n2) else _tiles_in_place(tile_fn, x1, x2, tiles)
    columns = _split(x1 if x2 is None else x2, b2)
    rows = _split(x1, b1, devices)

    def local_rows(row_tiles, column_tiles):
        return jax.lax.map(lambda r: jax.lax.map(lambda c: tile_fn(r, c), column_tiles), row_tiles)

    def assemble(blocks):  # (T1, T2, b1, b2, …) -> (N1, N2, …)
        t1, t2 = blocks.shape[:2]
        return jnp.swapaxes(blocks, 1, 2).reshape((t1 * b1, t2 * b2) + blocks.shape[4:])[:n1, :n2]

    return jax.tree_util.tree_map(assemble, on_devices(local_rows, rows, columns))


def _tiles_in_place(tile_fn: Callable, x1: Any, x2: Any | None, tiles: tuple[int, int]) -> Any:
    """:func:`tiled_kernel` on one device: each block written into the whole kernel in place, the last tile of a row
    or column ending at ``N`` (overlapping the one before it), so nothing is padded. For ``x₂ = x₁`` (square tiles)
    only the tiles on and above the diagonal are computed, ``Θ(x_b, x_a)_{qo} = Θ(x_a, x_b)_{oq}`` filling the
    others (ResNet-18's full kernel at N = 64: 6 tiles instead of 9, 31.0 s → 23.7 s). Up to ``_UNROLLED`` tiles run
    one after the other (:func:`after`), more in a loop."""
    (b1, b2), n1 = tiles, _size(x1)
    n2 = n1 if x2 is None else _size(x2)
    symmetric, other = x2 is None and b1 == b2, x1 if x2 is None else x2
    pairs = tile_starts(n1, n2, tiles, symmetric=symmetric)
    take = lambda tree, start, size: jax.tree_util.tree_map(  # noqa: E731
        lambda a: jax.lax.dynamic_slice_in_dim(a, start, size), tree)
    shapes = jax.eval_shape(tile_fn, take(x1, 0, b1), take(other, 0, b2))
    out = after(x1, jax.tree_util.tree_map(lambda s: jnp.zeros((n1, n2) + s.shape[2:], s.dtype), shapes))  # as in
    # _in_place: allocated no earlier than x1

    def step(out, r, c, unrolled):
        diagonal = unrolled and symmetric and r == c
        a, b = take(x1, r, b1), None if diagonal else take(other, c, b2)
        if unrolled:
            a, b = after(out, (a, b))
        blocks = tile_fn(a, b)
        out = _written(out, blocks, (r, c))
        if symmetric and not diagonal:  # in a loop a diagonal tile is also written transposed over itself
            out = _written(out, jax.tree_util.tree_map(lambda k: jnp.swapaxes(jnp.swapaxes(k, 0, 1), -1, -2),
                                                       blocks), (c, r))
        return out

    return _each_start(step, out, pairs)


def tile_starts(n1: int, n2: int, tiles: tuple[int, int], *, symmetric: bool) -> list[tuple[int, int]]:
    """The (row, column) starts of the tiles :func:`_tiles_in_place` computes: the last of a row or column ending at
    ``n``; with ``symmetric`` only those on and above the diagonal."""
    (b1, b2) = tiles
    rows = [min(i * b1, n1 - b1) for i in range(math.ceil(n1 / b1))]
    columns = [min(j * b2, n2 - b2) for j in range(math.ceil(n2 / b2))]
    return [(r, c) for i, r in enumerate(rows) for j, c in enumerate(columns) if not (symmetric and j < i)]


def _written(out: Any, blocks: Any, start: tuple) -> Any:
    """``out`` with ``blocks`` written in place from ``start`` (row, column)."""
    return jax.tree_util.tree_map(
        lambda o, k: jax.lax.dynamic_update_slice(o, k, (*start, *(0,) * (k.ndim - 2))), out, blocks)


def tiled_per_sample(fn: Callable[[jax.Array], object], x: jax.Array, tile: int):
    """``fn(x)`` for a per-sample ``fn`` (leaves ``(b, …)`` from ``b`` samples, e.g. kernel diagonals or features),
    computed ``tile`` samples at a time."""
    n = _size(x)
    if num_devices() == 1:
        return fn(x) if tile == n else _in_place(fn, x, tile)
    return _unsplit(on_devices(lambda t: jax.lax.map(fn, t), _split(x, tile, num_devices())), n)


def _in_place(fn: Callable[[jax.Array], object], x: jax.Array, tile: int):
    """``fn(x)`` a tile of samples at a time, each tile's result written into the whole result in place; the last
    tile ends at sample ``N`` (overlapping the one before it), so nothing is padded and nothing copied at the end.
    Up to ``_UNROLLED`` tiles one after the other (:func:`after`), more in a loop."""
    n, tile = _size(x), min(tile, _size(x))
    fn = jax.jit(fn)  # traced once, for the shapes of its results and for the loop
    take = lambda a, start: jax.lax.dynamic_slice_in_dim(a, start, tile)  # noqa: E731
    shapes = jax.eval_shape(fn, jax.tree_util.tree_map(lambda a: take(a, 0), x))

    def step(out, start, unrolled):
        part = fn(jax.tree_util.tree_map(lambda a: take(a, start), after(out, x) if unrolled else x))
        return jax.tree_util.tree_map(lambda o, p: jax.lax.dynamic_update_slice_in_dim(o, p, start, 0), out, part)

    # zeros made from x, so that XLA allocates them no earlier than x (e.g. not before the chunk before this one ends)
    out = after(x, jax.tree_util.tree_map(lambda s: jnp.zeros((n,) + s.shape[1:], s.dtype), shapes))
    return _each_start(step, out, [(min(t * tile, n - tile),) for t in range(math.ceil(n / tile))])


def _each_start(step: Callable[..., Any], out: Any, starts: list[tuple[int, ...]]) -> Any:
    """``out`` after ``out = step(out, *start, unrolled)`` for each of ``starts``: up to ``_UNROLLED`` of them
    unrolled (static starts; ``step`` makes its inputs wait for ``out`` with :func:`after`), more in a ``fori_loop``
    over traced starts."""
    if len(starts) > _UNROLLED:
        table = jnp.asarray(starts)
        return jax.lax.fori_loop(0, len(starts), lambda i, out: step(out, *table[i], False), out)
    for start in starts:
        out = step(out, *start, True)
    return out


def after(value: Any, tree: Any) -> Any:
    """``tree`` plus a zero computed from ``value``: what is computed from it waits for ``value``, and XLA's scheduler
    need not hold both steps' work at once (XLA's CPU pipeline drops ``optimization_barrier``). The zero is exact
    (a non-finite entry of ``value`` counts as 0)."""
    first = jax.tree_util.tree_leaves(value)[0].ravel()[0]
    zero = jnp.where(jnp.isfinite(first), first, 0) * 0
    return jax.tree_util.tree_map(lambda a: a + zero.astype(a.dtype), tree)


def plan_chunks(count: int, fits: Callable[[tuple[int, ...]], bool]) -> list[tuple[int, ...]] | None:
    """Units ``0 … count-1`` (leaves, layers) cut into consecutive chunks, each as long as ``fits`` allows (``fits``:
    whether a chunk's work fits the memory budget; a chunk that fits stays fitting when shortened); ``None`` when a
    unit alone does not fit. Each chunk's per-sample features of all samples are built and contracted while the
    others' are not held, at the price of one more backward pass per sample and chunk."""
    chunks, current = [], ()
    for unit in range(count):
        if current and not fits(current + (unit,)):
            chunks.append(current)
            current = ()
        if not current and not fits((unit,)):
            return None
        current += (unit,)
    return [*chunks, current]


def plan_parts(sizes: Sequence[int], fits: Callable[[int, int], bool]) -> list[tuple[int, int, int]] | None:
    """Units of ``sizes`` (leaves, counted in parameters) as parts ``(unit, start, stop)`` for :func:`plan_chunks`: each
    unit whole when it fits, else cut into the fewest slices of about equal size that fit (``fits(unit, count)``:
    whether a part of ``count`` of the unit's parameters fits, monotone in ``count`` below the unit's size); ``None``
    when one parameter of a unit does not fit."""
    parts = []
    for unit, size in enumerate(sizes):
        if fits(unit, size):
            parts.append((unit, 0, size))
            continue
        if not fits(unit, 1):
            return None
        count = math.ceil(size / _largest(lambda part, unit=unit: fits(unit, part), size))
        bounds = [size * k // count for k in range(count + 1)]
        parts += [(unit, start, stop) for start, stop in itertools.pairwise(bounds)]
    return parts


def plan_split(n1: int, n2: int, stored: int, build_bytes: TileBytesFn, contract_bytes: TileBytesFn,
               memory_budget: int, num_devices: int) -> tuple[int, tuple[int, int]] | None:
    """Feature tile and contraction tiles for :func:`tiled_split_kernel` within what ``memory_budget`` leaves
    beside the stored features of all samples (``stored`` bytes), or ``None`` when one sample does not fit."""
    left = memory_budget - stored
    rows = math.ceil(n1 / num_devices)
    if build_bytes(1, 0) > left or contract_bytes(1, 1) > left:
        return None
    feature_tile = _largest(lambda b: build_bytes(b, 0) <= left, rows)
    return _balanced(rows, feature_tile), plan_tiles(n1, n2, contract_bytes, left, num_devices)


def tiled_split_kernel(features_fn: Callable, contract_fn: Callable, x1: jax.Array, x2: jax.Array | None,
                       feature_tile: int, tiles: tuple[int, int]) -> Any:
    """The kernels from per-sample features built once per sample (``features_fn`` over tiles of
    ``feature_tile`` samples) and contracted tile by tile (``contract_fn(F₁, F₂)``: ``(b₁, b₂, …)`` blocks, as for
    :func:`tiled_kernel`)."""
    f1 = tiled_per_sample(features_fn, x1, feature_tile)
    f2 = None if x2 is None else tiled_per_sample(features_fn, x2, feature_tile)
    return tiled_kernel(lambda a, b: contract_fn(a, a if b is None else b), f1, f2, tiles)


def tiled_split_chunks(chunks: Sequence[tuple[Callable, Callable, int, tuple[int, int]]], x1: jax.Array,
                       x2: jax.Array | None) -> Any:
    """The sum over ``chunks`` of :func:`tiled_split_kernel` ``(features_fn, contract_fn, feature_tile, tiles)``
    (e.g. Θ = Σ_chunks J J^T over chunks of parameters), one chunk after the other (:func:`after`), so that only one
    chunk's features are held at a time. Always unrolled: the chunks are different programs, which a loop would run
    through ``lax.switch``, which XLA's CPU runtime ran 11 times slower (ResNet-18's Jacobian kernel in 11 chunks at
    N = 16: 152 s in a switch, 13 s unrolled)."""
    total = None
    for chunk in chunks:
        kernels = tiled_split_kernel(*chunk[:2], *((x1, x2) if total is None else after(total, (x1, x2))), *chunk[2:])
        total = kernels if total is None else jax.tree_util.tree_map(jnp.add, total, kernels)
    return total
