"""``ntkcv report RUN_DIR``: figures and a markdown summary from a run's HDF5 store."""

from __future__ import annotations

import pathlib
import re

import h5py
import numpy as np

from ntkcv.sinks.hdf5 import open_store


def read_scalars(path: str | pathlib.Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{name: (steps, values)}`` for every scalar in the store (readable while a run writes it; a store whose
    writer died is repaired first, see :func:`ntkcv.sinks.hdf5.open_store`)."""
    series: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    with open_store(path) as store:
        def visit(name, node):
            if isinstance(node, h5py.Group) and "step" in node and "value" in node:
                series[name] = (node["step"][()], node["value"][()])
        if "scalars" in store:
            store["scalars"].visititems(visit)
    return series


def read_array(path: str | pathlib.Path, name: str) -> tuple[np.ndarray, np.ndarray] | None:
    """``(steps, rows)`` of an array series such as ``cv/spectrum``, NaN-padded; None if absent."""
    with open_store(path) as store:
        key = f"arrays/{name}"
        if key not in store:
            return None
        return store[key]["step"][()], store[key]["value"][()]


def make_report(run_dir: str | pathlib.Path) -> pathlib.Path:
    """Write ``report/curves.png``, ``report/spectrum.png`` and ``report/summary.md``; returns the summary."""
    from matplotlib.figure import Figure  # the object interface: no pyplot state, no backend switch

    run_dir = pathlib.Path(run_dir)
    store = run_dir / "ntkcv.h5"
    if not store.is_file():
        raise FileNotFoundError(f"{run_dir} has no ntkcv.h5: is it a run directory written with output.hdf5 on?")
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    series = read_scalars(store)
    # each panel overlays a quantity's series: the loop's, and the CVs of every probe set (cv/<name>, cv/<set>/<name>)
    panels = {title: [name for name in sorted(series) if re.fullmatch(pattern, name)] for title, pattern in (
        ("loss", r"train/(test_)?loss"), ("entropy", r"cv/([^/]+/)?entropy"), ("trace", r"cv/([^/]+/)?trace"),
        ("drift from the first kernel", r"cv/([^/]+/)?relative_distance"), ("accuracy", r"train/test_accuracy"))}
    panels = {title: names for title, names in panels.items() if names}
    fig = Figure(figsize=(4 * max(len(panels), 1), 3.2))
    axes = fig.subplots(1, max(len(panels), 1), squeeze=False)
    for ax, (title, names) in zip(axes[0], panels.items(), strict=False):
        for name in names:
            steps, values = series[name]
            ax.plot(steps, values, marker="." if len(steps) < 50 else None, label=name)
        ax.set(title=title, xlabel="step")
        if len(names) > 1:
            ax.legend(fontsize="small")
        if title in ("loss", "trace"):
            ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)

    spectrum = read_array(store, "cv/spectrum") or read_array(store, "cv/train/spectrum")
    if spectrum is not None:
        steps, rows = spectrum
        fig = Figure(figsize=(6, 3.5))
        ax = fig.subplots()
        with np.errstate(divide="ignore", invalid="ignore"):
            image = np.log10(np.clip(rows, 1e-12, None)).T
        mesh = ax.imshow(image, aspect="auto", origin="upper", extent=(steps[0], steps[-1], rows.shape[1], 0))
        fig.colorbar(mesh, ax=ax, label="log10 eigenvalue")
        ax.set(title="NTK spectrum over training", xlabel="step", ylabel="eigenvalue index (descending)")
        fig.tight_layout()
        fig.savefig(out / "spectrum.png", dpi=120)

    lines = ["# ntkcv run report", "", f"Run: `{run_dir}`", "", "| quantity | first (step) | last (step) | min | max |",
             "|---|---|---|---|---|"]
    for name in sorted(series):
        steps, values = series[name]
        if len(values) == 0:
            continue
        lines.append(f"| {name} | {values[0]:.4g} ({steps[0]}) | {values[-1]:.4g} ({steps[-1]}) | "
                     f"{np.nanmin(values):.4g} | {np.nanmax(values):.4g} |")
    lines += ["", "![curves](curves.png)"] + (["", "![spectrum](spectrum.png)"] if spectrum is not None else [])
    summary = out / "summary.md"
    summary.write_text("\n".join(lines) + "\n")
    return summary
