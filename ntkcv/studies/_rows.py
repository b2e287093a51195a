"""Reading the rows of a sweep's results table (:func:`ntkcv.sweep.read_table`) the way every study needs."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Hashable, Iterable
from typing import Any


def require(rows: list[dict[str, Any]], column: str, hint: str) -> None:
    """Raise a ValueError naming ``column`` and ``hint`` (how to log it) unless some row has it."""
    if not rows:
        raise ValueError("the results table has no runs")
    if all(column not in row for row in rows):
        raise ValueError(f"the results table has no column {column!r}: {hint}")


def setting(row: dict[str, Any], key: str) -> Any:
    """The run's config value ``key`` (``"model.widths"``); lists, stored as JSON text, come back as tuples."""
    value = row.get(f"config.{key}")
    if isinstance(value, str) and value[:1] == "[":
        value = tuple(json.loads(value))
    return value


def number(row: dict[str, Any], column: str) -> float:
    """The row's cell ``column`` as a float; NaN when missing or empty."""
    value = row.get(column)
    return math.nan if value is None or isinstance(value, str) else float(value)


def status(row: dict[str, Any]) -> str:
    """``complete``, ``diverged`` or ``failed``; a complete run whose final ``cv`` values are not finite
    counts as diverged too (its kernel blew up before its loss did)."""
    value = row.get("status") or "failed"
    if value == "complete" and any(key.endswith(".final") and not key.startswith(("train.", "weights."))
                                   and isinstance(row[key], float) and not math.isfinite(row[key]) for key in row):
        return "diverged"
    return value


def train_size(row: dict[str, Any]) -> int | str:
    """The number of training points: ``len(data.indices)``, ``data.train_size``, or ``"all"``."""
    indices = setting(row, "data.indices")
    if indices:
        return len(indices)
    size = setting(row, "data.train_size")
    return "all" if size is None else int(size)


def architecture(row: dict[str, Any]) -> str:
    """``"64×2"`` for hidden widths (64, 64), ``"8-16"`` for mixed widths, ``"linear"`` for none."""
    widths = setting(row, "model.widths") or ()
    if not widths:
        return "linear"
    if len(set(widths)) == 1:
        return f"{widths[0]}" if len(widths) == 1 else f"{widths[0]}×{len(widths)}"
    return "-".join(map(str, widths))


def training(row: dict[str, Any]) -> str:
    """``"cross_entropy + adam(0.001)"``: the loss and the optimiser with its learning rate."""
    return (f"{setting(row, 'train.loss')} + {setting(row, 'optimizer.name')}"
            f"({setting(row, 'optimizer.learning_rate'):g})")


def group(rows: Iterable[dict[str, Any]], key: Callable[[dict[str, Any]], Hashable]) -> dict[Hashable, list]:
    """Rows by ``key(row)``, groups in order of first appearance."""
    groups: dict[Hashable, list] = {}
    for row in rows:
        groups.setdefault(key(row), []).append(row)
    return groups


def size_order(size: int | str) -> tuple[int, int]:
    """Sort key for :func:`train_size` values: numbers ascending, then ``"all"``."""
    return (1, 0) if size == "all" else (0, int(size))


def architecture_order(row: dict[str, Any]) -> tuple[int, int]:
    """Sort key: total hidden units, then depth."""
    widths = setting(row, "model.widths") or ()
    return sum(widths), len(widths)
