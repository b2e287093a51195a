r"""Study 5: full-batch gradient descent at the edge of stability.

Cohen et al. (2021, arXiv 2103.00065) find that under full-batch gradient descent with step size η the sharpness
(the top eigenvalue of the loss Hessian) first rises (*progressive sharpening*) and then, once it reaches the
stability threshold 2/η of gradient descent on a quadratic, stops rising and hovers at or just above 2/η (the
*edge of stability*), while the loss keeps falling, non-monotonically. For the MSE loss the top Gauss–Newton
eigenvalue (the NTK's top eigenvalue over n, :mod:`ntkcv.curvature`) tracks it.

**Prediction** (stated before the runs): for every η with 2/η above the initial sharpness λ₀, (1) the sharpness
rises above λ₀, and (2) once it has reached 95 % of 2/η, its median over the rest of the run lies within 10 % of
2/η: the ratio λ/(2/η) is in [0.9, 1.1].

A cell of the sweep is a learning rate; its runs differ in ``train.seed`` (the initialisation and the 200 training
points). For each run, from ``curvature/ggn_max`` and ``curvature/hessian_max`` (the sweep's
``monitor.curvature``):

* ``initial``: λ₀, the Gauss–Newton sharpness at step 0; ``peak``: the largest over the run;
* ``reached``: the first step at which it is at least 0.95 · 2/η (NaN: never);
* ``edge``: the median of λ/(2/η) from ``reached`` on (NaN if never reached), and ``hessian_edge`` the same of the
  Hessian's top eigenvalue;
* ``loss_rises``: the fraction of the steps from ``reached`` on whose loss is above the previous step's.

A cell's claims use the mean over seeds with its bootstrap 95 % interval. Runs whose λ₀ is already above 2/η start
beyond the edge (a catapult, Lewkowycz et al. 2020) and are left out of both claims.

``values`` of the findings: ``cells``, a list of dicts with ``learning_rate``, ``threshold`` (2/η), ``seeds``,
``beyond`` (runs starting beyond the edge), ``initial``, ``sharpening`` (peak/λ₀) and ``edge`` and ``hessian_edge``
(:class:`~ntkcv.studies._stats.Estimate`), ``reached`` (mean step, over the runs that reached it, and how many did)
and ``loss_rises``.
"""

from __future__ import annotations

import math
import pathlib
from typing import Any

import numpy as np

from ntkcv.studies import _rows
from ntkcv.studies._findings import Claim, Findings, Table, fmt, verdict
from ntkcv.studies._plots import save, subplots
from ntkcv.studies._stats import finite_mean, mean_ci

#: How close to 2/η the sharpness must come to count as having reached the edge.
REACHED = 0.95
#: The predicted band of the median sharpness over 2/η at the edge.
BAND = (0.9, 1.1)
SERIES = ("curvature/ggn_max", "curvature/hessian_max", "train/loss")


def annotate(rows: list[dict[str, Any]], sweep_dir: pathlib.Path) -> list[dict[str, Any]]:
    """The rows with each run's curvature summary (module doc), read from its HDF5 store."""
    from ntkcv.report import read_scalars

    annotated = []
    for row in rows:
        store = pathlib.Path(sweep_dir) / "runs" / row["run_id"] / "ntkcv.h5"
        series = read_scalars(store) if store.is_file() else {}
        annotated.append({**row, **summarise(series, _rows.setting(row, "optimizer.learning_rate"))})
    return annotated


def summarise(series: dict[str, tuple[np.ndarray, np.ndarray]], learning_rate: float) -> dict[str, float]:
    """One run's ``initial``, ``peak``, ``reached``, ``edge``, ``hessian_edge`` and ``loss_rises`` (module doc) from its
    scalar series; all NaN without ``curvature/ggn_max``."""
    names = ("initial", "peak", "reached", "edge", "hessian_edge", "loss_rises")
    if "curvature/ggn_max" not in series:
        return dict.fromkeys(names, math.nan)
    threshold = 2.0 / learning_rate
    steps, ggn = series["curvature/ggn_max"]
    at_edge = np.flatnonzero(ggn >= REACHED * threshold)
    summary = {"initial": float(ggn[0]), "peak": float(np.max(ggn)), "reached": math.nan, "edge": math.nan,
               "hessian_edge": math.nan, "loss_rises": math.nan}
    if at_edge.size:
        start = int(steps[at_edge[0]])
        summary.update(reached=float(start), edge=float(np.median(ggn[at_edge[0]:]) / threshold))
        if "curvature/hessian_max" in series:
            hessian_steps, hessian = series["curvature/hessian_max"]
            summary["hessian_edge"] = float(np.median(hessian[hessian_steps >= start]) / threshold)
        if "train/loss" in series:
            loss_steps, loss = series["train/loss"]
            later = loss[loss_steps >= start]
            summary["loss_rises"] = float(np.mean(np.diff(later) > 0)) if later.size > 1 else math.nan
    return summary


def analyse(rows: list[dict[str, Any]]) -> Findings:
    """The cells' sharpening and edge ratios with intervals, and verdicts on the two claims (module doc)."""
    _rows.require(rows, "initial", "annotate the rows first (a sweep with monitor.curvature: true)")
    failed = [r for r in rows if _rows.status(r) == "failed"]
    rows = [r for r in rows if _rows.status(r) != "failed"]
    cells = [_cell(rate, members) for rate, members in
             sorted(_rows.group(rows, lambda r: _rows.setting(r, "optimizer.learning_rate")).items())]
    rising = [c for c in cells if not math.isnan(c["sharpening"].low)]  # judged: two or more runs inside the edge
    sharpened = [c for c in rising if c["sharpening"].low > 1]
    judged = [c for c in cells if not math.isnan(c["edge"].low)]
    hovering = [c for c in judged if BAND[0] <= c["edge"].low and c["edge"].high <= BAND[1]]
    sharpening = "; ".join(f"η = {c['learning_rate']:g}: {c['sharpening'].format('.3f')}" for c in cells)
    edges = "; ".join(f"η = {c['learning_rate']:g}: {c['edge'].format('.3f')}" for c in cells)
    claims = (
        Claim("Under full-batch gradient descent the sharpness rises while it is below 2/η (progressive sharpening; "
              "Cohen et al. 2021, arXiv 2103.00065).", verdict(len(sharpened), len(rising)),
              f"peak/initial Gauss–Newton sharpness is above 1 (interval) at {len(sharpened)} of {len(rising)} "
              f"learning rates ({sharpening})."),
        Claim("Once the sharpness reaches 2/η it stops rising and hovers at about 2/η (the edge of stability; Cohen "
              "et al. 2021).", verdict(len(hovering), len(judged)),
              f"the median of λ/(2/η) after reaching the edge lies within [{BAND[0]}, {BAND[1]}] (interval) at "
              f"{len(hovering)} of {len(judged)} learning rates ({edges})."),
    )
    table = Table(
        "Gauss–Newton sharpness λ (top eigenvalue of the GGN on the whole training set) under full-batch gradient "
        "descent; means over seeds with bootstrap 95% intervals",
        ("η", "2/η", "seeds", "beyond the edge at start", "λ₀", "peak / λ₀", "step reaching 0.95·2/η",
         "λ/(2/η) after", "Hessian λ/(2/η) after", "loss rises"),
        tuple((f"{c['learning_rate']:g}", f"{c['threshold']:.1f}", str(c["seeds"]), str(c["beyond"]),
               fmt(c["initial"], ".1f"), c["sharpening"].format(".3f"),
               f"{fmt(c['reached'][0], '.0f')} ({c['reached'][1]}/{c['seeds']})", c["edge"].format(".3f"),
               c["hessian_edge"].format(".3f"), fmt(c["loss_rises"], ".2f")) for c in cells),
    )
    notes = ("'loss rises': the fraction of steps after reaching the edge whose training loss is above the previous "
             "step's (the non-monotone descent Cohen et al. describe).",)
    if failed:
        notes += (f"{len(failed)} runs failed (an error, see results.csv) and are left out.",)
    return Findings("edge_of_stability", "Edge of stability under full-batch gradient descent", claims, (table,),
                    notes, {"cells": cells})


def figures(rows: list[dict[str, Any]], out_dir: pathlib.Path, *, sweep_dir: pathlib.Path | None = None
            ) -> list[pathlib.Path]:
    """``edge_of_stability.png``: per learning rate, the Gauss–Newton (solid) and Hessian (dotted) sharpness of every
    seed over training with 2/η dashed, and the training loss below (needs ``sweep_dir`` with the runs' stores)."""
    if sweep_dir is None:
        return []
    import matplotlib

    from ntkcv.report import read_scalars

    rates = sorted(_rows.group(rows, lambda r: _rows.setting(r, "optimizer.learning_rate")))
    fig, axes = subplots(2, len(rates), panel=(3.4, 2.4), sharex=True, height_ratios=(2, 1))
    colours = matplotlib.colormaps["tab10"].colors
    for column, rate in enumerate(rates):
        top, bottom = axes[0, column], axes[1, column]
        members = [r for r in rows if _rows.setting(r, "optimizer.learning_rate") == rate]
        for seed, row in enumerate(members):
            store = pathlib.Path(sweep_dir) / "runs" / row["run_id"] / "ntkcv.h5"
            if not store.is_file():
                continue
            series, colour = read_scalars(store), colours[seed % len(colours)]
            if "curvature/ggn_max" in series:
                top.plot(*series["curvature/ggn_max"], color=colour, lw=1.2,
                         label=f"seed {_rows.setting(row, 'train.seed')}")
            if "curvature/hessian_max" in series:
                top.plot(*series["curvature/hessian_max"], color=colour, lw=0.8, ls=":")
            if "train/loss" in series:
                bottom.plot(*series["train/loss"], color=colour, lw=0.8)
        top.axhline(2 / rate, color="black", ls="--", lw=1, label="2/η")
        top.set_title(f"η = {rate:g}", fontsize=9)
        bottom.set(yscale="log", xlabel="step")
    axes[0, 0].set_ylabel("sharpness (GGN —, Hessian ···)")
    axes[1, 0].set_ylabel("training loss")
    axes[0, -1].legend(fontsize=7)
    fig.suptitle("Full-batch gradient descent, MSE, tanh MLP 64×64 on 200 digits", fontsize=10)
    return [save(fig, out_dir / "edge_of_stability.png")]


def _cell(rate: float, members: list[dict[str, Any]]) -> dict[str, Any]:
    threshold = 2.0 / rate
    inside = [r for r in members if _rows.number(r, "initial") < threshold]  # not beyond the edge at the start
    reached = [_rows.number(r, "reached") for r in inside if not math.isnan(_rows.number(r, "reached"))]
    return {"learning_rate": rate, "threshold": threshold, "seeds": len(members),
            "beyond": len(members) - len(inside),
            "initial": finite_mean([_rows.number(r, "initial") for r in members]),
            "sharpening": mean_ci([_rows.number(r, "peak") / _rows.number(r, "initial") for r in inside]),
            "reached": (finite_mean(reached), len(reached)),
            "edge": mean_ci([_rows.number(r, "edge") for r in inside]),
            "hessian_edge": mean_ci([_rows.number(r, "hessian_edge") for r in inside]),
            "loss_rises": finite_mean([_rows.number(r, "loss_rises") for r in inside])}

