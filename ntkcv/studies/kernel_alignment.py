r"""Study 6: does the NTK align with the task during training, and more so away from the lazy regime?

Baratin et al. (2021, "Implicit regularization via neural feature alignment", arXiv 2008.00938) find that the
tangent kernel's alignment with the labels rises during training, on training and on held-out points, as the
tangent features concentrate along a few task-relevant directions (also Kopitkov & Indelman 2020, Shan & Bordelon
2021). Near the lazy (kernel) limit of Jacot et al. (2018) the kernel barely moves, so the alignment should barely
move either.

The alignment is the *centred* kernel–target alignment of the output-traced NTK Θ on ``N`` probe points with the
one-hot target kernel :math:`T = YY^⊤` (:math:`T_{ij} = [y_i = y_j]`; Cortes, Mohri & Rostamizadeh 2012;
:func:`ntkcv.cv.centred_target_alignment`). Baratin et al. centre too (the tangent features over the samples, and
the targets), on the full kernel of all outputs; here the kernel is summed over the outputs, Θ = Σ_k Θ_kk:

.. math::
   A_c(Θ) = \frac{⟨HΘH, HTH⟩_F}{\|HΘH\|_F \, \|HTH\|_F}, \qquad H = I_N - \tfrac1N \mathbf 1 \mathbf 1^⊤ .

The uncentred alignment :math:`⟨Θ, T⟩_F / (\|Θ\|_F \|T\|_F)` (``cv/<set>/target_alignment``,
:func:`ntkcv.cv.target_alignment`) is reported beside it; the mean of Θ, which any positive kernel has, inflates it.

**Prediction** (stated before the runs): (1) the centred alignment of the NTK on held-out (test) points rises
during training, :math:`ΔA = A_c(\text{final}) − A_c(\text{initial}) > 0`, in the settings that learn features;
(2) it rises more where features are learnt than near the lazy limit: at each width more at the larger step than
at the smaller one, and at each step more in the narrower network than in the wider one.

A cell of the sweep is a network (``model.widths``) and a learning rate; its runs differ in ``train.seed`` (the
initialisation, the training subset and the probes). The step of a cell is the rank of its learning rate among its
network's learning rates, so a sweep may scale the learning rate with the width (in the standard
parameterisation the NTK grows with the width, and the stable step shrinks as 1/width). The cell of the narrowest
network at its largest step is labelled *feature learning*, that of the widest network at its smallest step
*near-lazy*, the others *intermediate*. Per run, from the results table (``.initial`` is the first firing, at
step 0; ``.final`` the last):

* ``initial``, ``final``, ``delta``: :math:`A_c` of the test probes' kernel, ``peak`` its largest value over the
  run minus ``initial``, and ``train_delta`` the ``delta`` of the training probes' kernel
  (``cv/train/centred_target_alignment``), ``uncentred_delta`` that of the uncentred test alignment;
* ``drift``: the final relative distance ‖Θ_T − Θ_0‖_F / ‖Θ_0‖_F of the test probes' kernel from its initial one.

Claims, with bootstrap 95% intervals over seeds (:func:`~ntkcv.studies._stats.mean_ci`): (1) ΔA > 0 in every cell
but the near-lazy one; (2) each step towards the lazy limit (the next smaller learning rate of a network; the next
wider network at the same step rank) lowers ΔA: the paired difference over seeds (the same seed draws the same
data in both cells) is positive; and, as the premise, (3) the same steps lower the kernel's drift.

``values`` of the findings: ``cells``, a list of dicts with ``architecture``, ``width`` (total hidden units),
``learning_rate``, ``step`` (rank from 0, the smallest), ``regime``, ``seeds``, ``diverged``, ``initial``,
``final``, ``delta``, ``peak``, ``train_delta``, ``uncentred_delta`` and ``drift``
(:class:`~ntkcv.studies._stats.Estimate`), ``accuracy`` (mean final test accuracy); ``comparisons``, a list of
dicts with ``factor`` (``"step"`` or ``"width"``), ``label``, ``more`` and ``less`` (the cells' labels, ``more`` the
one further from the lazy limit), ``delta`` and ``drift`` (Estimates of the paired differences ``more − less``)
and ``equal_time``: for steps, the difference of ΔA_c with the larger step's run cut where its gradient-flow time
η·t equals the smaller step's run's at its end (needs :func:`annotate`; NaN for widths).
"""

from __future__ import annotations

import itertools
import math
import pathlib
from collections.abc import Callable
from typing import Any

import numpy as np

from ntkcv.studies import _rows
from ntkcv.studies._findings import Claim, Findings, Table, fmt, verdict
from ntkcv.studies._plots import save, subplots
from ntkcv.studies._stats import Estimate, finite_mean, mean_ci

TEST = "test.centred_target_alignment"
TRAIN = "train.centred_target_alignment"
UNCENTRED = "test.target_alignment"
DRIFT = "test.relative_distance"
REGIMES = ("feature learning", "intermediate", "near-lazy")
#: The series the figure draws: the centred alignment on the test and training probes.
SERIES = ("cv/test/centred_target_alignment", "cv/train/centred_target_alignment")
#: The column :func:`annotate` adds: the run's test-probe alignment curve ``(steps, A_c)``, in step order.
CURVE = "test_curve"


def annotate(rows: list[dict[str, Any]], sweep_dir: pathlib.Path) -> list[dict[str, Any]]:
    """The rows with each run's :data:`CURVE`, read from its HDF5 store (no column where the store or the series is
    missing)."""
    from ntkcv.report import read_scalars

    annotated = []
    for row in rows:
        store = pathlib.Path(sweep_dir) / "runs" / str(row["run_id"]) / "ntkcv.h5"
        series = read_scalars(store) if store.is_file() else {}
        curve = {}
        if SERIES[0] in series:
            steps, values = series[SERIES[0]]
            order = np.argsort(steps, kind="stable")
            curve[CURVE] = (steps[order].astype(np.float64), values[order].astype(np.float64))
        annotated.append({**row, **curve})
    return annotated


def analyse(rows: list[dict[str, Any]]) -> Findings:
    """The cells' alignment changes and drifts with intervals, the paired comparisons towards the lazy limit and
    verdicts on the three claims (module doc)."""
    _rows.require(rows, f"{TEST}.initial", "log the centred alignment on test probes (monitor.cvs with "
                  "centred_target_alignment and monitor.probe_sets [train, test])")
    failed = [r for r in rows if _rows.status(r) == "failed"]
    rows = [r for r in rows if _rows.status(r) != "failed"]
    groups = _rows.group(rows, _cell_key)
    networks = sorted({key[:2] for key in groups})  # (total hidden units, depth)
    rates = {network: sorted(key[3] for key in groups if key[:2] == network) for network in networks}
    cells, members = [], []
    for key in sorted(groups):
        network, rate = key[:2], key[3]
        step = rates[network].index(rate)
        regime = ("feature learning" if network == networks[0] and step == len(rates[network]) - 1
                  else "near-lazy" if network == networks[-1] and step == 0 else "intermediate")
        cells.append(_cell(groups[key], architecture=key[2], width=network[0], learning_rate=rate, step=step,
                           regime=regime))
        members.append(groups[key])
    comparisons = _comparisons(cells, members)
    claims = (_rise_claim(cells), _ordering_claim(comparisons, "delta", "ΔA_c (test)"),
              _ordering_claim(comparisons, "drift", "the drift"))
    table = Table(
        "Centred kernel–target alignment A_c of the NTK on the test probes (and ΔA on the training probes), from "
        "step 0 to the last step (and to its largest value, 'peak − initial'); drift = ‖Θ_T − Θ_0‖_F / ‖Θ_0‖_F of "
        "the test probes' kernel; means over seeds with bootstrap 95% intervals",
        ("network", "η", "regime", "seeds", "A_c initial", "A_c final", "ΔA_c test", "peak − initial",
         "ΔA_c train", "ΔA test, uncentred", "drift", "test accuracy"),
        tuple((c["architecture"], f"{c['learning_rate']:g}", c["regime"],
               f"{c['seeds']}" + (f" ({c['diverged']} diverged)" if c["diverged"] else ""),
               fmt(c["initial"].value), fmt(c["final"].value), str(c["delta"]), str(c["peak"]),
               str(c["train_delta"]),
               str(c["uncentred_delta"]), c["drift"].format(".3f"), fmt(c["accuracy"])) for c in cells),
    )
    paired = Table(
        "Paired differences over seeds between neighbouring cells, the one further from the lazy limit minus the "
        "nearer one (bootstrap 95% intervals)",
        ("towards the lazy limit", "further", "nearer", "Δ(ΔA_c test)", "Δ(ΔA_c test) at equal ηt", "Δ(drift)"),
        tuple((c["label"], c["more"], c["less"], str(c["delta"]),
               "—" if c["factor"] == "width" else str(c["equal_time"]), str(c["drift"])) for c in comparisons),
    )
    notes = ("A_c is the centred alignment (Cortes et al. 2012), as Baratin et al. use it; the uncentred alignment "
             "(ntkcv's target_alignment) counts the kernel's mean, which every positive kernel has, as alignment.",
             "At a fixed number of steps a smaller learning rate also trains less. 'At equal ηt' takes the larger "
             "step's run at the step where η·t equals the smaller step's run's at its end (gradient-flow time; "
             "linear between firings): what the larger step adds beyond training longer along the same gradient flow. "
             "It is for the step comparisons only: across widths η·t is not the time scale (the NTK's size is).")
    diverged = sum(c["diverged"] for c in cells)
    if diverged:
        notes += (f"{diverged} runs diverged (a non-finite loss or kernel) and are left out of the intervals.",)
    if failed:
        notes += (f"{len(failed)} runs failed (an error, see results.csv) and are left out.",)
    return Findings("kernel_alignment", "Kernel–target alignment of the NTK during training", claims,
                    (table, paired), notes, {"cells": cells, "comparisons": comparisons})


def figures(rows: list[dict[str, Any]], out_dir: pathlib.Path, *, sweep_dir: pathlib.Path | None = None
            ) -> list[pathlib.Path]:
    """``kernel_alignment_drift.png``: each run's ΔA_c on the test probes against its kernel drift, per cell; with
    ``sweep_dir`` also ``kernel_alignment.png``: per cell (rows: networks, columns: steps), the centred alignment on
    the test (solid) and training (dashed) probes over training, one thin line per seed, on a log-time axis."""
    rows = [r for r in rows if _rows.status(r) != "failed"]
    if not rows:
        return []
    groups = _rows.group(rows, _cell_key)
    paths = [_drift_figure(groups, out_dir)]
    if sweep_dir is not None:
        paths.insert(0, _trajectory_figure(groups, out_dir, pathlib.Path(sweep_dir)))
    return paths


def _cell_key(row: dict[str, Any]) -> tuple[int, int, str, float]:
    width, depth = _rows.architecture_order(row)
    return width, depth, _rows.architecture(row), float(_rows.setting(row, "optimizer.learning_rate"))


def _run(row: dict[str, Any]) -> dict[str, float]:
    """One run's alignment change and drift (module doc); NaN where a column is missing."""
    initial, final = _rows.number(row, f"{TEST}.initial"), _rows.number(row, f"{TEST}.final")
    return {"initial": initial, "final": final, "delta": final - initial,
            "peak": _rows.number(row, f"{TEST}.max") - initial,
            "train_delta": _rows.number(row, f"{TRAIN}.final") - _rows.number(row, f"{TRAIN}.initial"),
            "uncentred_delta": _rows.number(row, f"{UNCENTRED}.final") - _rows.number(row, f"{UNCENTRED}.initial"),
            "drift": _rows.number(row, f"{DRIFT}.final")}


def _cell(members: list[dict[str, Any]], **labels: Any) -> dict[str, Any]:
    kept = [_run(r) for r in members if _rows.status(r) == "complete"]
    return {**labels, "seeds": len(members), "diverged": len(members) - len(kept),
            **{name: mean_ci([run[name] for run in kept]) for name in
               ("initial", "final", "delta", "peak", "train_delta", "uncentred_delta", "drift")},
            "accuracy": finite_mean([_rows.number(r, "train.test_accuracy.final") for r in members
                                     if _rows.status(r) == "complete"])}


def _label(cell: dict[str, Any]) -> str:
    return f"{cell['architecture']}, η = {cell['learning_rate']:g}"


def _comparisons(cells: list[dict[str, Any]], members: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Neighbouring cells one step apart towards the lazy limit: a network's next smaller learning rate, and the
    next wider network at the same step rank (only between networks with equally many learning rates);
    ``members[i]`` are the rows of ``cells[i]``, which come sorted by network, then learning rate."""
    networks = list(_rows.group(range(len(cells)), lambda i: cells[i]["architecture"]).values())
    pairs = [("step", f"{cells[less]['architecture']}: η {cells[less]['learning_rate']:g} → "
              f"{cells[more]['learning_rate']:g}", more, less)
             for indices in networks for less, more in itertools.pairwise(indices)]
    for narrow, wide in itertools.pairwise(networks):
        if len(narrow) == len(wide):
            pairs += [("width", f"{_label(cells[more])} → {_label(cells[less])}", more, less)
                      for more, less in zip(narrow, wide, strict=True)]
    undefined = Estimate(math.nan, math.nan, math.nan, 0)
    return [{"factor": factor, "label": label, "more": _label(cells[more]), "less": _label(cells[less]),
             "delta": _paired(members[more], members[less], lambda a, b: _run(a)["delta"] - _run(b)["delta"]),
             "drift": _paired(members[more], members[less], lambda a, b: _run(a)["drift"] - _run(b)["drift"]),
             "equal_time": _paired(members[more], members[less], _equal_time) if factor == "step" else undefined}
            for factor, label, more, less in pairs]


def _paired(more: list[dict[str, Any]], less: list[dict[str, Any]],
            difference: Callable[[dict[str, Any], dict[str, Any]], float]) -> Estimate:
    """The mean of ``difference(row of more, row of less)`` over the seeds complete in both cells, with its
    bootstrap interval."""
    def by_seed(rows: list[dict[str, Any]]) -> dict[Any, dict[str, Any]]:
        return {_rows.setting(r, "train.seed"): r for r in rows if _rows.status(r) == "complete"}

    a, b = by_seed(more), by_seed(less)
    return mean_ci([difference(a[seed], b[seed]) for seed in a if seed in b])


def _equal_time(more: dict[str, Any], less: dict[str, Any]) -> float:
    """ΔA_c of the run ``more`` (the larger learning rate) up to the step at which its η·t equals that of the run
    ``less`` at its last firing (linear between firings), minus ``less``'s ΔA_c; NaN without both curves."""
    if CURVE not in more or CURVE not in less:
        return math.nan
    (steps, values), (less_steps, less_values) = more[CURVE], less[CURVE]
    time = less_steps[-1] * _rows.setting(less, "optimizer.learning_rate") / _rows.setting(more,
                                                                                          "optimizer.learning_rate")
    return float(np.interp(time, steps, values) - values[0] - (less_values[-1] - less_values[0]))


def _rise_claim(cells: list[dict[str, Any]]) -> Claim:
    judged = [c for c in cells if c["regime"] != "near-lazy" and not math.isnan(c["delta"].low)]
    rose = [c for c in judged if c["delta"].sign == 1]
    fell = [c for c in judged if c["delta"].sign == -1]
    unjudged = sum(c["regime"] != "near-lazy" for c in cells) - len(judged)
    detail = "; ".join(f"{_label(c)} ({c['regime']}): ΔA_c = {c['delta']}" for c in cells)
    return Claim("The NTK's alignment with the labels on held-out points rises during training (Baratin et al. 2021, "
                 "arXiv 2008.00938).", verdict(len(rose), len(judged)),
                 f"ΔA_c on the test probes is significantly positive in {len(rose)} of {len(judged)} cells away from "
                 f"the near-lazy one" + (f", negative in {len(fell)}" if fell else "")
                 + (f"; {unjudged} cells without an interval" if unjudged else "") + f" ({detail}).")


def _ordering_claim(comparisons: list[dict[str, Any]], quantity: str, name: str) -> Claim:
    judged = [c for c in comparisons if not math.isnan(c[quantity].low)]
    hits = [c for c in judged if c[quantity].sign == 1]
    against = [c["label"] for c in judged if c[quantity].sign == -1]
    detail = "; ".join(f"{c['label']}: {c[quantity]}" for c in comparisons)
    timed = [c for c in comparisons if c["factor"] == "step" and not math.isnan(c["equal_time"].low)]
    if quantity == "delta":
        paper = ("The alignment rises more where features are learnt (larger step, narrower network) than near the "
                 "lazy limit (Baratin et al. 2021; Shan & Bordelon 2021).")
        if timed:
            detail += (f"; at equal gradient-flow time η·t the larger step's ΔA_c is significantly larger in "
                       f"{sum(c['equal_time'].sign == 1 for c in timed)} and smaller in "
                       f"{sum(c['equal_time'].sign == -1 for c in timed)} of {len(timed)} step comparisons: "
                       + "; ".join(f"{c['label']}: {c['equal_time']}" for c in timed))
    else:
        paper = ("Premise: towards the lazy limit (smaller step, wider network) the kernel moves less (Jacot et al. "
                 "2018; Lee et al. 2019).")
    return Claim(paper, verdict(len(hits), len(judged)),
                 f"{name} is significantly larger in the cell further from the lazy limit in {len(hits)} of "
                 f"{len(judged)} paired comparisons" + (f"; significantly smaller at {', '.join(against)}"
                                                        if against else "") + f" ({detail}).")



def _trajectory_figure(groups: dict[Any, list], out_dir: pathlib.Path, sweep_dir: pathlib.Path) -> pathlib.Path:
    from ntkcv.report import read_scalars

    widths = sorted({key[:2] for key in groups})
    rates = {width: sorted(key[3] for key in groups if key[:2] == width) for width in widths}
    columns = max(len(r) for r in rates.values())
    fig, axes = subplots(len(widths), columns, panel=(3.4, 2.5), sharex=True, sharey=True)
    for row_index, width in enumerate(widths):
        for column in range(columns):
            ax = axes[row_index, column]
            if column >= len(rates[width]):
                ax.set_visible(False)
                continue
            rate = rates[width][column]
            key = next(k for k in groups if k[:2] == width and k[3] == rate)
            for row in groups[key]:
                store = sweep_dir / "runs" / row["run_id"] / "ntkcv.h5"
                if not store.is_file():
                    continue
                series = read_scalars(store)
                for name, colour, style in zip(SERIES, ("C0", "C1"), ("-", "--"), strict=True):
                    if name in series:
                        steps, values = series[name]
                        order = np.argsort(steps)
                        ax.plot(steps[order] + 1, values[order], color=colour, ls=style, lw=0.9, alpha=0.8)
            ax.set(xscale="log", title=f"{key[2]}, η = {rate:g}")
            ax.title.set_fontsize(9)
            if row_index == len(widths) - 1:
                ax.set_xlabel("step + 1")
        axes[row_index, 0].set_ylabel("centred alignment A_c")
    axes[0, 0].plot([], [], color="C0", label="test probes")
    axes[0, 0].plot([], [], color="C1", ls="--", label="training probes")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("NTK–label alignment over training (one line per seed)", fontsize=10)
    return save(fig, out_dir / "kernel_alignment.png")


def _drift_figure(groups: dict[Any, list], out_dir: pathlib.Path) -> pathlib.Path:
    import matplotlib

    fig, axes = subplots(1, 1, panel=(4.6, 3.4))
    ax = axes[0, 0]
    for index, key in enumerate(sorted(groups)):
        runs = [_run(r) for r in groups[key] if _rows.status(r) == "complete"]
        ax.scatter([r["drift"] for r in runs], [r["delta"] for r in runs], s=22, color=matplotlib.colormaps["tab10"](
            index % 10), label=f"{key[2]}, η = {key[3]:g}")
    ax.axhline(0, color="black", lw=0.8)
    ax.set(xlabel="kernel drift ‖Θ_T − Θ_0‖_F / ‖Θ_0‖_F (test probes)", ylabel="ΔA_c (test probes)")
    ax.legend(fontsize=7)
    return save(fig, out_dir / "kernel_alignment_drift.png")
