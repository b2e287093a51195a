"""Figures written to files through matplotlib's object interface (no pyplot, no backend switch: nothing
process-wide changes), and the scatter panel the correlation studies share."""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

from ntkcv.studies._stats import Estimate


def subplots(rows: int, columns: int, *, panel: tuple[float, float], **options: Any) -> tuple[Any, np.ndarray]:
    """A figure of ``rows × columns`` panels of size ``panel`` (inches), laid out by matplotlib's constrained
    layout; the axes as a 2-D array."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(panel[0] * columns, panel[1] * rows), layout="constrained")
    return figure, figure.subplots(rows, columns, squeeze=False, **options)


def save(figure: Any, path: pathlib.Path) -> pathlib.Path:
    """Write ``figure`` as a PNG at ``path`` (creating its folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


def scatter(ax: Any, x: np.ndarray, y: np.ndarray, rho: Estimate, *, xlabel: str, ylabel: str, title: str,
            label: str | None = None, logx: bool = False) -> None:
    """``y`` against ``x`` with Spearman's ρ and its interval in the legend (or the title)."""
    ax.scatter(x, y, s=14, alpha=0.75, label=f"{label}: ρ = {rho}" if label else None)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title if label else f"{title}\nρ = {rho}")
    if logx:
        ax.set_xscale("log")
    if label:
        ax.legend(fontsize=7)
