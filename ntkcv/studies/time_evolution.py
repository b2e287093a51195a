r"""Study 1: does the NTK entropy fall, stay or rise during training, and where?

Tovey et al. (arXiv 2410.07451) report that the entropy of the empirical NTK falls during training in small
networks ("information compression") and rises in deeper or wider ones ("structure formation"). A cell of
the sweep is a loss, an optimiser (with its learning rate), a training-set size ``n`` and an architecture;
its runs differ in ``train.seed``. For each run

.. math::
   ΔS = S_\text{final} - S_\text{initial}, \qquad S = \text{effective entropy} = S_{vN} / \ln n ∈ [0, 1],

of the traced NTK on the training points (``data.probe_set: train``). A cell's regime is

* **diverged** if any of its runs diverged (non-finite loss or CVs); ΔS over the other runs is still shown;
* else **rose** / **fell** if the bootstrap 95% interval of the mean ΔS over seeds lies above / below 0;
* else **stayed** (the interval contains 0); **n/a** with fewer than two finished runs.

Compression can be transient (an early dip, then a rise; Tovey et al. 2024), which ΔS does not see, so each cell
also gets the dip :math:`S_\text{min} - S_0` and the recovery :math:`S_\text{end} - S_\text{min}` with their
intervals, and the mean step of the minimum; a cell has a **transient dip** when the dip's interval lies below 0
and the recovery's above. With dense early snapshots (``monitor.log_spaced``) the trajectories figure has a
logarithmic step axis. With two probe sets (``train`` and ``test``) the CVs of the training points are read.

When the sweep varies the activation or the outputs the NTK is of (``monitor.outputs``: logits or softmax), a
cell's ``network`` names them too (``12×3 relu softmax``); the claims judge every variant of the smallest and
largest ``architecture``.

``values`` of the findings: ``cells``, a list of dicts with ``training``, ``n``, ``architecture``, ``network``,
``seeds``, ``diverged``, ``failed``, ``initial``, ``minimum``, ``final`` (mean effective entropies), ``delta``,
``dip`` and ``recovery`` (:class:`~ntkcv.studies._stats.Estimate` s), ``dip_step``, ``transient``, ``regime``,
``log10_trace_ratio`` and ``test_accuracy``.
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

CV = "effective_entropy"
REGIMES = ("fell", "stayed", "rose", "diverged", "n/a")
_COLOURS = {"fell": "#4c72b0", "stayed": "#dddddd", "rose": "#c44e52", "diverged": "#222222", "n/a": "#ffffff"}


def analyse(rows: list[dict[str, Any]]) -> Findings:
    """ΔS with its interval and the regime of every cell, its transient, and verdicts on the claims (module doc)."""
    prefix = _prefix(rows)
    _rows.require(rows, f"{prefix}{CV}.initial", f"log it with monitor.cvs: [{CV}, …]")
    cells = [_cell(key, members, prefix) for key, members in _cells(rows).items()]
    order = {name: _rows.architecture_order(members[0]) for name, members in
             _rows.group(rows, _rows.architecture).items()}
    smallest, largest = min(order, key=order.get), max(order, key=order.get)
    claims = (
        _regime_claim("Entropy falls during training in small networks (information compression; Tovey et al. "
                      "2024, arXiv 2410.07451).", "fell", smallest, cells, "smallest"),
        _regime_claim("Entropy rises during training in deeper and wider networks (structure formation; Tovey et "
                      "al. 2024).", "rose", largest, cells, "largest"),
        _transient_claim(smallest, cells),
    )
    table = Table(
        "Effective NTK entropy S/ln n on the training points, initial → final; ΔS = mean over seeds with its "
        "bootstrap 95% interval",
        ("training", "n", "network", "seeds", "S initial", "S min", "S final", "ΔS [95% CI]", "regime",
         "S min − S initial", "S final − S min", "step of min", "diverged", "log10 tr ratio", "test acc."),
        tuple((c["training"], str(c["n"]), c["network"], str(c["seeds"]), fmt(c["initial"]),
               fmt(c["minimum"]), fmt(c["final"]), str(c["delta"]), f"**{c['regime']}**",
               str(c["dip"]) + (" (transient)" if c["transient"] else ""), str(c["recovery"]),
               fmt(c["dip_step"], ".0f"), f"{c['diverged']}/{c['seeds']}", fmt(c["log10_trace_ratio"], "+.2f"),
               fmt(c["test_accuracy"])) for c in cells),
    )
    counts = {training: {regime: sum(c["regime"] == regime for c in members) for regime in REGIMES}
              for training, members in _rows.group(cells, lambda c: c["training"]).items()}
    notes = tuple(f"{training}: " + ", ".join(f"{k} {v}" for k, v in count.items() if v) + " cells"
                  for training, count in counts.items())
    failed = sum(c["failed"] for c in cells)
    if failed:
        notes += (f"{failed} runs failed (an error, see results.csv) and are left out of ΔS.",)
    return Findings("time_evolution", "Time evolution of the NTK entropy", claims, (table,), notes,
                    {"cells": cells, "counts": counts, "smallest": smallest, "largest": largest})


def figures(rows: list[dict[str, Any]], out_dir: pathlib.Path, *, sweep_dir: pathlib.Path | None = None
            ) -> list[pathlib.Path]:
    """``time_evolution_regimes.png`` (the regime map: ΔS per network × n, one panel per training setup) and,
    given ``sweep_dir`` with the runs' HDF5 stores, ``time_evolution_trajectories.png`` (S over training, mean
    over the seeds whose runs logged the same steps)."""
    from matplotlib.patches import Rectangle

    cells = analyse(rows).values["cells"]
    trainings = list(_rows.group(cells, lambda c: c["training"]))
    sizes = sorted({c["n"] for c in cells}, key=_rows.size_order)
    label = _labeller(rows)
    networks = list(_rows.group(sorted(rows, key=_rows.architecture_order), label))
    fig, axes = subplots(1, len(trainings), panel=(max(2.8, 0.9 * len(sizes) + 1.4), 0.45 * len(networks) + 1.6),
                         sharey=True)
    for ax, training in zip(axes[0], trainings, strict=True):
        for c in (c for c in cells if c["training"] == training):
            x, y = sizes.index(c["n"]), networks.index(c["network"])
            ax.add_patch(Rectangle((x - 0.5, y - 0.5), 1, 1, color=_COLOURS[c["regime"]]))
            text = "NaN" if c["regime"] == "diverged" and math.isnan(c["delta"].value) else f"{c['delta'].value:+.2f}"
            ax.text(x, y, text, ha="center", va="center", fontsize=8,
                    color="white" if c["regime"] in ("diverged", "fell", "rose") else "black")
        ax.set(xlim=(-0.5, len(sizes) - 0.5), ylim=(-0.5, len(networks) - 0.5), xticks=range(len(sizes)),
               xticklabels=sizes, yticks=range(len(networks)), yticklabels=networks, xlabel="training points n")
        ax.set_title(training.replace(" + ", "\n"), fontsize=9)
    axes[0, 0].set_ylabel("hidden widths")
    handles = [Rectangle((0, 0), 1, 1, color=_COLOURS[r]) for r in REGIMES[:4]]
    fig.legend(handles, REGIMES[:4], loc="outside lower center", fontsize=7, ncols=4)
    fig.suptitle("ΔS of the effective NTK entropy over training", fontsize=10)
    paths = [save(fig, out_dir / "time_evolution_regimes.png")]
    if sweep_dir is not None:
        paths += _trajectories(rows, trainings, sizes, networks, out_dir, pathlib.Path(sweep_dir))
    return paths


def _trajectories(rows, trainings, sizes, networks, out_dir, sweep_dir) -> list[pathlib.Path]:
    import matplotlib

    from ntkcv.report import read_scalars

    fig, axes = subplots(len(trainings), len(sizes), panel=(4.0, 3.0), sharey=True)
    colours = matplotlib.colormaps["viridis"](np.linspace(0, 0.9, len(networks)))
    plotted, name = False, f"cv/{_prefix(rows).replace('.', '/')}{CV}"
    for (training, n, network), members in _cells(rows).items():
        curves = []
        for row in members:
            store = sweep_dir / "runs" / row["run_id"] / "ntkcv.h5"
            if store.is_file() and name in (series := read_scalars(store)):
                curves.append(series[name])
        if not curves:
            continue
        steps = curves[0][0]
        same = [values for s, values in curves if np.array_equal(s, steps)]
        ax = axes[trainings.index(training), sizes.index(n)]
        ax.plot(steps, np.mean(same, axis=0), color=colours[networks.index(network)], label=network, marker=".")
        plotted = True
        ax.set(xlabel="step")
        ax.set_xscale("symlog", linthresh=1)  # early snapshots are dense: a logarithmic step axis, 0 included
        ax.set_title(f"{training}, n={n}", fontsize=8)
    if not plotted:
        return []
    for ax in axes[:, 0]:
        ax.set_ylabel("S / ln n")
    handles = {label: handle for ax in axes.flat
               for handle, label in zip(*ax.get_legend_handles_labels(), strict=True)}
    fig.legend(handles.values(), handles.keys(), loc="outside right upper", fontsize=7, title="network")
    return [save(fig, out_dir / "time_evolution_trajectories.png")]


def _cells(rows: list[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    """Rows by cell (training, n, network): trainings in order of appearance, then n and network ascending."""
    trainings = list(_rows.group(rows, _rows.training))
    ordered = sorted(rows, key=lambda r: (trainings.index(_rows.training(r)), _rows.size_order(_rows.train_size(r)),
                                          _rows.architecture_order(r)))
    label = _labeller(rows)
    return _rows.group(ordered, lambda r: (_rows.training(r), _rows.train_size(r), label(r)))


def _labeller(rows: list[dict[str, Any]]):
    """``row -> network label``: the architecture, with the activation and the kernel's outputs where they vary."""
    varying = [key for key in ("model.activation", "monitor.outputs")
               if len({_rows.setting(r, key) or "logits" for r in rows}) > 1]
    return lambda row: " ".join([_rows.architecture(row), *(_rows.setting(row, k) or "logits" for k in varying)])


def _prefix(rows: list[dict[str, Any]]) -> str:
    """``"train."`` when the runs logged two probe sets (``cv/train/…``), else ``""``."""
    return "train." if any(f"train.{CV}.initial" in row for row in rows) else ""


def _cell(key: tuple, members: list[dict[str, Any]], prefix: str = "") -> dict[str, Any]:
    training, n, network = key
    statuses = [_rows.status(row) for row in members]
    finished = [row for row, s in zip(members, statuses, strict=True) if s == "complete"]
    initial = np.array([_rows.number(row, f"{prefix}{CV}.initial") for row in finished])
    final = np.array([_rows.number(row, f"{prefix}{CV}.final") for row in finished])
    minimum = np.array([_rows.number(row, f"{prefix}{CV}.min") for row in finished])
    dip_steps = [_rows.number(row, f"{prefix}{CV}.argmin_step") for row, low, start in
                 zip(finished, minimum, initial, strict=True) if low < start]
    delta, dip, recovery = mean_ci(final - initial), mean_ci(minimum - initial), mean_ci(final - minimum)
    diverged = statuses.count("diverged")
    regime = ("diverged" if diverged else "n/a" if delta.n < 2 else
              {1: "rose", -1: "fell", 0: "stayed"}[delta.sign])
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.log10([_rows.number(r, f"{prefix}trace.final") / _rows.number(r, f"{prefix}trace.initial")
                          for r in finished])
    return {"training": training, "n": n, "architecture": _rows.architecture(members[0]), "network": network,
            "seeds": len(members), "diverged": diverged,
            "failed": statuses.count("failed"), "initial": finite_mean(initial), "minimum": finite_mean(minimum),
            "final": finite_mean(final), "delta": delta, "regime": regime, "log10_trace_ratio": finite_mean(ratio),
            "dip": dip, "recovery": recovery, "dip_step": finite_mean(dip_steps),
            "transient": dip.high < 0 < recovery.low,
            "test_accuracy": finite_mean([_rows.number(r, "train.test_accuracy.final") for r in finished])}


def _where(cell: dict[str, Any]) -> str:
    variant = cell["network"].removeprefix(cell["architecture"]).strip()
    return f"{cell['training']}, n={cell['n']}" + (f", {variant}" if variant else "")


def _transient_claim(network: str, cells: list[dict[str, Any]]) -> Claim:
    """Judged on the cells of ``network`` with intervals for the dip and the recovery."""
    mine = [c for c in cells if c["architecture"] == network and not math.isnan(c["dip"].low)
            and not math.isnan(c["recovery"].low)]
    transient = [c for c in mine if c["transient"]]
    examples = "; ".join(f"{_where(c)}: S_min − S_0 = {c['dip']}, S_end − S_min = {c['recovery']} "
                         f"(minimum at step {fmt(c['dip_step'], '.0f')})" for c in transient[:3])
    return Claim("Compression is often transient: the entropy dips early, then rises (Tovey et al. 2024).",
                 verdict(len(transient), len(mine)),
                 f"a significant dip followed by a significant rise in {len(transient)} of the {len(mine)} cells of "
                 f"the smallest network ({network})" + (f": {examples}." if examples else "."))


def _regime_claim(paper: str, expected: str, network: str, cells: list[dict[str, Any]], which: str) -> Claim:
    """Judged on the cells of ``network`` that fell, stayed or rose; diverged and n/a cells say nothing about
    the entropy's trend and are only counted."""
    mine = [c for c in cells if c["architecture"] == network]
    decided = [c for c in mine if c["regime"] in ("fell", "stayed", "rose")]
    hits = sum(c["regime"] == expected for c in decided)
    counts = ", ".join(f"{sum(c['regime'] == r for c in mine)} {r}" for r in REGIMES if any(c["regime"] == r
                                                                                         for c in mine))
    examples = "; ".join(f"{_where(c)}: ΔS = {c['delta']}" for c in decided[:4])
    examples += f" and {len(decided) - 4} more" if len(decided) > 4 else ""
    return Claim(paper, verdict(hits, len(decided)),
                 f"of the {len(mine)} cells of the {which} network ({network}): {counts}; the entropy {expected} in "
                 f"{hits} of the {len(decided)} with a trend" + (f" ({examples})." if examples else "."))
