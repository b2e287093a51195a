"""Parameter groups: the NTK as a sum of the kernels of disjoint groups of parameters.

.. math::
   Θ = \\sum_g Θ_g, \\qquad Θ_g(x_a, x_b) = \\sum_{θ ∈ g} J_θ(x_a)\\, J_θ(x_b)^\\top

(traced output axes summed, as for Θ). A leaf's *path* is its key path in ``params`` joined with ``/``
(``Dense_0/kernel``); the trailing ``value`` attribute of a wrapped variable (``nnx.Param``) is dropped
(``conv/kernel``). Groups are given as:

- ``"layers"``: one group per layer, named by the path without its last key (``Dense_0``; a leaf at the top
  level of ``params`` is a group of its own, named by its key); groups in order of first leaf.
- a mapping ``{name: pattern or patterns}``: ``fnmatch`` patterns (case-sensitive; ``*`` also matches ``/``)
  matched against whole paths, groups in the mapping's order. Every leaf must match the patterns of exactly
  one group and every group at least one leaf; anything else is a ``ValueError`` naming the leaves (or the
  group), so no parameter is silently dropped or counted twice.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

GroupSpec = str | Mapping[str, str | Sequence[str]]
LeafGroups = tuple[int, ...]  # the group index of each leaf of params, in jax.tree_util.tree_leaves order
_SHOWN = 20  # leaf paths listed in an error message


class Partition(NamedTuple):
    """Group names and the group index of each leaf (static: read from the structure of ``params``)."""

    names: tuple[str, ...]
    leaf_groups: LeafGroups


def leaf_paths(params: Any) -> list[str]:
    """The ``/``-joined path of each leaf of ``params``, in ``tree_leaves`` order."""
    paths = []
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        if len(path) > 1 and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
            path = path[:-1]
        paths.append(jax.tree_util.keystr(path, simple=True, separator="/"))
    return paths


def check_groups(groups: GroupSpec) -> str | dict[str, tuple[str, ...]]:
    """``"layers"``, or a copy of the mapping with a tuple of patterns per group, checked for types and emptiness."""
    if isinstance(groups, str):
        if groups != "layers":
            raise ValueError(f"groups must be 'layers' or a mapping {{name: pattern(s)}}, got {groups!r}")
        return groups
    if not isinstance(groups, Mapping):
        raise TypeError(f"groups must be 'layers' or a mapping {{name: pattern(s)}}, got {type(groups).__name__}")
    if not groups:
        raise ValueError("groups must name at least one group, got an empty mapping")
    checked = {}
    for name, patterns in groups.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"groups names must be non-empty strings, got {name!r}")
        patterns = (patterns,) if isinstance(patterns, str) else patterns
        if (not isinstance(patterns, Sequence) or not patterns
                or not all(isinstance(p, str) and p for p in patterns)):
            raise TypeError(f"groups[{name!r}] must be a pattern or a non-empty sequence of patterns (non-empty "
                            f"strings), got {groups[name]!r}")
        checked[name] = tuple(patterns)
    return checked


def _listed(paths: Sequence[str]) -> str:
    more = f" and {len(paths) - _SHOWN} more" if len(paths) > _SHOWN else ""
    return ", ".join(repr(p) for p in paths[:_SHOWN]) + more


def partition(params: Any, groups: GroupSpec) -> Partition:
    """The groups of the leaves of ``params`` (see the module docstring); errors name the leaves at fault."""
    groups = check_groups(groups)
    paths = leaf_paths(params)
    if groups == "layers":
        layers = [path.rsplit("/", 1)[0] for path in paths]
        index = {layer: i for i, layer in enumerate(dict.fromkeys(layers))}
        return Partition(tuple(index), tuple(index[layer] for layer in layers))
    names = tuple(groups)
    matches = [[g for g, patterns in enumerate(groups.values()) if any(fnmatch.fnmatchcase(path, p) for p in patterns)]
               for path in paths]
    for g, (name, patterns) in enumerate(groups.items()):
        if not any(g in found for found in matches):
            raise ValueError(f"groups[{name!r}] ({', '.join(map(repr, patterns))}) matches no leaf of params; leaf "
                             f"paths: {_listed(paths)}")
    unmatched = [path for path, found in zip(paths, matches, strict=True) if not found]
    if unmatched:
        raise ValueError(f"every leaf of params must be in one group; in none: {_listed(unmatched)}")
    twice = [f"{path!r} ({', '.join(repr(names[g]) for g in found)})"
             for path, found in zip(paths, matches, strict=True) if len(found) > 1]
    if twice:
        raise ValueError(f"every leaf of params must be in one group only; in several: {', '.join(twice)}")
    return Partition(names, tuple(found[0] for found in matches))


def parameter_groups(params: Any, groups: GroupSpec = "layers") -> dict[str, tuple[str, ...]]:
    """The leaf paths of each group of ``params``: ``{group name: (leaf path, …)}``, in group order.

    Shows what ``ntk_fn(..., groups=groups)`` will sum into each group kernel, and checks user patterns.

    Example:
      >>> import jax.numpy as jnp, ntkcv
      >>> params = {"Dense_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)}, "scale": jnp.ones(4)}
      >>> ntkcv.parameter_groups(params)
      {'Dense_0': ('Dense_0/bias', 'Dense_0/kernel'), 'scale': ('scale',)}
      >>> ntkcv.parameter_groups(params, {"weights": "*kernel", "rest": ["*bias", "scale"]})
      {'weights': ('Dense_0/kernel',), 'rest': ('Dense_0/bias', 'scale')}
    """
    names, leaf_groups = partition(params, groups)
    paths = leaf_paths(params)
    return {name: tuple(p for p, g in zip(paths, leaf_groups, strict=True) if g == i) for i, name in enumerate(names)}


def group_sums(terms: Iterable[tuple[int, jax.Array]], leaf_groups: LeafGroups | None) -> tuple[jax.Array, ...]:
    """One sum per group of ``terms``, each term ``(leaf index, array)`` added to that leaf's group.

    ``leaf_groups=None``: one group of all leaves. A group that receives no term (a chunk of leaves that has none of
    its leaves) gets zeros; there must be at least one term.
    """
    count = 1 if leaf_groups is None else max(leaf_groups) + 1
    totals: list[Any] = [None] * count
    for leaf, term in terms:
        g = 0 if leaf_groups is None else leaf_groups[leaf]
        totals[g] = term if totals[g] is None else totals[g] + term
    some = next(total for total in totals if total is not None)
    return tuple(jnp.zeros_like(some) if total is None else total for total in totals)
