"""The sweep's results table: one row per run, summarising its config and logged series (CSV)."""

from __future__ import annotations

import csv
import json
import math
import os
import pathlib
import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from ntkcv.config import flatten

_HEAD = ("run_id", "status", "error")
_INTEGER = re.compile(r"[-+]?\d+")
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|[-+]?(nan|inf|infinity)", re.IGNORECASE)


def summarise_run(run_dir: str | pathlib.Path) -> dict[str, Any]:
    """One table row from a run's directory (``result.json``, ``config.json`` and ``ntkcv.h5``).

    Columns: ``run_id``, ``status`` and ``error`` (from ``result.json``; ``run_id`` defaults to the folder's
    name); ``config.<section>.<key>`` (lists as JSON strings); for each ``cv/<name>`` scalar series
    ``<name>.initial``, ``.final``, ``.min``, ``.max``, ``.argmin_step``, ``.argmax_step`` (extrema over the
    finite values; NaN and None when there are none); ``train.<name>.final`` and ``weights.<name>.final``
    for the ``train/…`` and ``weights/…`` series; and ``seconds`` (the wall time of the run's last
    session). Files that are missing contribute no columns. A ``/`` inside a name becomes ``.``.
    """
    run_dir = pathlib.Path(run_dir)
    result = read_json(run_dir / "result.json") or {}
    row: dict[str, Any] = {"run_id": result.get("run_id", run_dir.name), "status": result.get("status"),
                           "error": result.get("error")}
    config = read_json(run_dir / "config.json")
    if config is not None:
        row.update({f"config.{key}": value for key, value in flat_config(config).items()})
    row.update(series_summary(run_dir / "ntkcv.h5"))
    row["seconds"] = result.get("seconds")
    return row


def series_summary(store: pathlib.Path) -> dict[str, Any]:
    """The key points of each scalar series in an HDF5 store (empty if the file does not exist)."""
    from ntkcv.report import read_scalars

    if not store.is_file():
        return {}
    summary: dict[str, Any] = {}
    for name, (steps, values) in sorted(read_scalars(store).items()):
        kind, _, rest = name.partition("/")
        if not values.size:
            continue
        order = np.argsort(steps, kind="stable")
        steps, values = steps[order], values[order].astype(np.float64)
        column = rest.replace("/", ".")
        if kind in ("train", "weights"):
            summary[f"{kind}.{column}.final"] = float(values[-1])
        elif kind == "cv":
            summary |= {f"{column}.initial": float(values[0]), f"{column}.final": float(values[-1])}
            finite = np.isfinite(values)
            for extremum, pick, fill in (("min", np.argmin, np.inf), ("max", np.argmax, -np.inf)):
                i = int(pick(np.where(finite, values, fill))) if finite.any() else None
                summary[f"{column}.{extremum}"] = float(values[i]) if i is not None else math.nan
                summary[f"{column}.arg{extremum}_step"] = int(steps[i]) if i is not None else None
    return summary


def write_table(path: pathlib.Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Writes ``rows`` as CSV, atomically: the head columns, the config columns, the metrics (sorted),
    ``seconds``; a cell a row lacks is empty."""
    rows = list(rows)
    seen = dict.fromkeys(key for row in rows for key in row)
    config = [key for key in seen if key.startswith("config.")]
    metrics = sorted(key for key in seen if key not in (*_HEAD, "seconds", *config))
    columns = [*_HEAD, *config, *metrics, "seconds"]
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(columns)
        writer.writerows([_cell(row.get(column)) for column in columns] for row in rows)
    os.replace(temporary, path)


def read_table(path: str | pathlib.Path) -> list[dict[str, Any]]:
    """A results table back as dicts, cells parsed: empty → None, ``True``/``False`` → bool, integers → int,
    other numbers (``nan``, ``inf`` included) → float, anything else stays a string."""
    with open(path, newline="") as file:
        return [{key: _parse(cell) for key, cell in row.items()} for row in csv.DictReader(file)]


def read_json(path: pathlib.Path) -> Any:
    """The JSON in ``path``, or None if it does not exist."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def write_json(path: pathlib.Path, value: Any) -> None:
    """Writes ``value`` as JSON atomically (a temporary file, then ``os.replace``)."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(value, indent=2))
    os.replace(temporary, path)


def flat_config(tree: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted keys, lists and tuples as JSON strings (one table cell each)."""
    return {key: json.dumps(value) if isinstance(value, (list, tuple)) else value
            for key, value in flatten(dict(tree)).items()}


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)  # shortest exact form; nan, inf
    return str(value)


def _parse(cell: str | None) -> Any:
    if cell is None or cell == "":
        return None
    if cell in ("True", "False"):
        return cell == "True"
    if _INTEGER.fullmatch(cell):
        return int(cell)
    if _FLOAT.fullmatch(cell):
        return float(cell)
    return cell
