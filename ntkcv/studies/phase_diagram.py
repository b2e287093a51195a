r"""The phase diagram: the NTK entropy and trace at initialisation and after training over a width × depth grid.

Tovey et al. (2024, arXiv 2410.07451; the figure ``phases.pdf`` of their ``dynamics_study/mnist-dense/
scale-diagram.ipynb``) colour a width × depth plane of dense ReLU networks trained on 1000 MNIST images (Adam 1e-3,
batch 128, softmax outputs) by the entropy of the NTK on the training points, its trace and the training loss, at
epoch 0 and at epoch 99, one seed per network. Their abstract names two mechanisms: *information compression*,
the entropy falling during training, "predominantly in small neural networks", and *structure formation*, the
entropy rising, ubiquitous "in deep neural network architectures".

A *cell* is a network of ``depth`` hidden layers of equal ``width`` (``model.widths = [width] * depth``); its runs
differ in ``train.seed``. Per run, with the kernel Θ of the probes (one probe set: ``cv/<name>``):

.. math::
   S = -\sum_i p_i \ln p_i,\quad p_i = λ_i / \textstyle\sum_j λ_j, \qquad ΔS = S_T - S_0, \qquad
   \bar τ = \operatorname{tr} Θ / N,

read from ``entropy.initial`` / ``.final`` (:math:`S_0`, :math:`S_T`, the authors' convention: not divided by
:math:`\ln N`, which ranks the same at fixed :math:`N`) and ``mean_trace.initial`` / ``.final`` (:math:`\bar τ_0`,
:math:`\bar τ_T`, the mean diagonal, the authors' "trace" since mid-2024; ntkcv sums the kernel over the outputs
where neural-tangents averages, so theirs is :math:`\bar τ / K` for :math:`K` outputs, the same ranking). Each cell
gets the mean over seeds with a bootstrap 95% interval (:func:`~ntkcv.studies._stats.mean_ci`) of these and of the
final training-batch loss and test accuracy. Runs that diverged or failed are counted per cell and named in the
notes, not averaged; grid points without a run are listed as missing.

Scaling: at each depth, :math:`S_0` and :math:`S_T` against width, and at each width against depth, are fitted by a
power law and a logarithm (:func:`~ntkcv.studies.fit.compare_fits`, the seeds as bootstrap groups); :math:`ΔS`,
which changes sign, by a logarithm alone (:func:`~ntkcv.studies.fit.fit_logarithmic`).

Claims: :math:`S_0` and :math:`S_T` rise with width at every depth and with depth at every width (the power law's
exponent above 0); ΔS is negative in the smallest network and positive in the largest; ΔS rises with width and with
depth (the logarithm's slope above 0); :math:`S ≤ \ln N` bounds any growth, so the logarithm fits at least as well
as the power law.

``values`` of the findings: ``grid`` (a :class:`PhaseGrid`) and ``fits``, a list of dicts with ``along``
(``"width"`` or ``"depth"``), ``at`` (the fixed depth or width), ``entropy_initial`` and ``entropy_final``
(:class:`~ntkcv.studies.fit.FitComparison` or None with fewer than two usable values of ``along``) and
``entropy_change`` (:class:`~ntkcv.studies.fit.LogFit` or None).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Callable
from typing import Any

import numpy as np

from ntkcv.studies import _rows
from ntkcv.studies._findings import Claim, Findings, Table, fmt, sign_claim, verdict
from ntkcv.studies._plots import save, subplots
from ntkcv.studies._stats import Estimate, mean_ci
from ntkcv.studies.fit import FitComparison, LogFit, compare_fits, fit_logarithmic

#: Per-run quantities of a cell (name → label), each averaged over the cell's seeds.
QUANTITIES = {"entropy_initial": "S₀", "entropy_final": "S_T", "entropy_change": "ΔS", "trace_initial": "tr₀/N",
              "trace_final": "tr_T/N", "loss_final": "final loss", "test_accuracy": "test acc."}
ENTROPIES = ("entropy_initial", "entropy_final")
#: A final training loss below which the softmax counts as saturated: most training points then have 1 − p near or
#: below float32's resolution at 1 (6e-8), where their rows of the NTK of the probabilities round to zero.
SATURATED_LOSS = 1e-6


@dataclasses.dataclass(frozen=True)
class Cell:
    """The runs of one network: ``runs`` (the finished ones: ``seed`` and the :data:`QUANTITIES`), the seeds of those
    that ``diverged`` or ``failed``, and the mean of each quantity over ``runs`` with its interval."""

    width: int
    depth: int
    runs: tuple[dict[str, Any], ...]
    diverged: tuple[Any, ...]
    failed: tuple[Any, ...]
    estimates: dict[str, Estimate]


@dataclasses.dataclass(frozen=True)
class PhaseGrid:
    """The cells of a sweep by ``(width, depth)``, on the ``widths`` × ``depths`` its runs span."""

    widths: tuple[int, ...]
    depths: tuple[int, ...]
    cells: dict[tuple[int, int], Cell]

    @property
    def missing(self) -> tuple[tuple[int, int], ...]:
        """The ``(width, depth)`` points of the grid without any run."""
        return tuple((w, d) for d in self.depths for w in self.widths if (w, d) not in self.cells)

    def matrix(self, name: str) -> np.ndarray:
        """The cells' mean ``name`` as a ``(depths, widths)`` array; NaN where a cell is missing or has no runs."""
        return np.array([[self.cells[(w, d)].estimates[name].value if (w, d) in self.cells else math.nan
                          for w in self.widths] for d in self.depths])


def network(row: dict[str, Any]) -> tuple[int, int]:
    """``(width, depth)`` of a run's MLP of equal hidden widths.

    Raises:
      ValueError: the hidden widths are empty or unequal.
    """
    widths = _rows.setting(row, "model.widths") or ()
    if not widths or len(set(widths)) != 1:
        raise ValueError(f"the phase diagram needs MLPs of equal hidden widths (model.widths: [w, w, …]); run "
                         f"{row.get('run_id')!r} has model.widths {list(widths)}")
    return int(widths[0]), len(widths)


def run_values(row: dict[str, Any]) -> dict[str, float]:
    """One run's :data:`QUANTITIES` (NaN where the table lacks a value)."""
    initial, final = _rows.number(row, "entropy.initial"), _rows.number(row, "entropy.final")
    return {"entropy_initial": initial, "entropy_final": final, "entropy_change": final - initial,
            "trace_initial": _rows.number(row, "mean_trace.initial"),
            "trace_final": _rows.number(row, "mean_trace.final"), "loss_final": _rows.number(row, "train.loss.final"),
            "test_accuracy": _rows.number(row, "train.test_accuracy.final")}


def assemble(rows: list[dict[str, Any]]) -> PhaseGrid:
    """The rows as a :class:`PhaseGrid`: one :class:`Cell` per network, its finished runs averaged, its diverged
    and failed runs counted (:func:`ntkcv.studies._rows.status`).

    Raises:
      ValueError: no rows, a run's widths are unequal (:func:`network`), or the rows mix activations or output
        kernels (``model.activation``, ``monitor.outputs``): one phase diagram is of one of each.
    """
    if not rows:
        raise ValueError("the results table has no runs")
    for key in ("model.activation", "monitor.outputs"):
        found = sorted({str(_rows.setting(row, key)) for row in rows})
        if len(found) > 1:
            raise ValueError(f"a phase diagram is of one {key}; the runs have {', '.join(found)}: run one sweep "
                             "per setting")
    cells = {}
    for (width, depth), members in _rows.group(rows, network).items():
        statuses = [_rows.status(row) for row in members]
        runs = tuple({"seed": _rows.setting(row, "train.seed"), **run_values(row)}
                     for row, status in zip(members, statuses, strict=True) if status == "complete")
        seeds = {kind: tuple(_rows.setting(row, "train.seed") for row, status in zip(members, statuses, strict=True)
                             if status == kind) for kind in ("diverged", "failed")}
        cells[(width, depth)] = Cell(width, depth, runs, seeds["diverged"], seeds["failed"],
                                     {name: mean_ci([run[name] for run in runs]) for name in QUANTITIES})
    return PhaseGrid(tuple(sorted({w for w, _ in cells})), tuple(sorted({d for _, d in cells})),
                     dict(sorted(cells.items(), key=lambda item: (item[0][1], item[0][0]))))


def analyse(rows: list[dict[str, Any]]) -> Findings:
    """The cells with their intervals, the fits along width and depth, and the claims (module doc)."""
    _rows.require(rows, "entropy.initial", "log it on one probe set (monitor.cvs: [entropy, …], "
                  "monitor.probe_sets: [train])")
    _rows.require(rows, "mean_trace.initial", "log it with monitor.cvs: [mean_trace, …]")
    grid = assemble(rows)
    fits = _fits(grid)
    claims = (
        *(_rise_claim(fits, name, along) for name in ENTROPIES for along in ("width", "depth")),
        _mechanism_claim(grid),
        *(_change_claim(fits, along) for along in ("width", "depth")),
        _form_claim(fits),
    )
    tables = (
        Table("Per cell (hidden width × depth): means over seeds with bootstrap 95% intervals. S: NTK entropy (not "
              "divided by ln N); tr/N: mean diagonal of the output-summed kernel; 0: initialisation, T: the last step",
              ("width", "depth", "seeds", "S₀", "S_T", "ΔS", "tr₀/N", "tr_T/N", "final loss", "test acc.",
               "diverged / failed"),
              tuple((str(c.width), str(c.depth), str(len(c.runs)),
                     *(c.estimates[name].format(".3f") for name in ENTROPIES),
                     c.estimates["entropy_change"].format("+.3f"),
                     *(c.estimates[name].format(".3g") for name in ("trace_initial", "trace_final", "loss_final")),
                     c.estimates["test_accuracy"].format(".3f"), f"{len(c.diverged)} / {len(c.failed)}")
                    for c in grid.cells.values())),
        Table("Fits of the entropy along one axis at a fixed value of the other: power law S = a·x^b and logarithm "
              "S = a + b ln x (intervals: bootstrap over seeds; R² of S itself); ΔS by the logarithm alone",
              ("quantity", "along", "at", "points", "power law b", "R² power", "log slope b", "R² log", "better"),
              tuple(row for fit in fits for row in _fit_rows(fit))),
    )
    return Findings("phase_diagram", "The phase diagram: NTK entropy and trace over width × depth", claims, tables,
                    _notes(grid, softmax=_rows.setting(rows[0], "monitor.outputs") == "softmax"),
                    {"grid": grid, "fits": fits})


def figures(rows: list[dict[str, Any]], out_dir: pathlib.Path, *, sweep_dir: pathlib.Path | None = None
            ) -> list[pathlib.Path]:
    """``phase_diagram.png``: heat maps over width × depth (both axes logarithmic) of S₀, S_T (one colour scale), ΔS
    (diverging, centred on 0), tr₀/N, tr_T/N (one logarithmic scale) and the final training loss (logarithmic), each
    cell annotated with its mean (``†n``: n diverged runs; blank: missing); ``phase_diagram_fits.png``: S₀, S_T and
    ΔS against width per depth and against depth per width, cell means with intervals and the better fit dashed."""
    del sweep_dir
    findings = analyse(rows)
    grid, fits = findings.values["grid"], findings.values["fits"]
    return [_heat_maps(grid, out_dir / "phase_diagram.png"), _fit_lines(grid, fits, out_dir / "phase_diagram_fits.png")]


def _fits(grid: PhaseGrid) -> list[dict[str, Any]]:
    fits = []
    for along, fixed_values in (("width", grid.depths), ("depth", grid.widths)):
        for fixed in fixed_values:
            runs = [(getattr(cell, along), run) for cell in grid.cells.values()
                    if getattr(cell, "depth" if along == "width" else "width") == fixed for run in cell.runs]
            fit = {"along": along, "at": fixed}
            fit.update({name: _fitted(compare_fits, runs, name, positive=True) for name in ENTROPIES})
            fit["entropy_change"] = _fitted(fit_logarithmic, runs, "entropy_change", positive=False)
            fits.append(fit)
    return fits


def _fitted(fit_fn: Callable[..., Any], runs: list[tuple[int, dict[str, Any]]], name: str, *, positive: bool
            ) -> FitComparison | LogFit | None:
    """``fit_fn`` of ``name`` against the axis over ``runs`` (seeds as groups); None with fewer than two distinct
    axis values among the usable points."""
    usable = [(x, run) for x, run in runs if math.isfinite(run[name]) and (run[name] > 0 or not positive)]
    if len({x for x, _ in usable}) < 2:
        return None
    return fit_fn([x for x, _ in usable], [run[name] for _, run in usable], groups=[run["seed"] for _, run in usable])


def _rise_claim(fits: list[dict[str, Any]], name: str, along: str) -> Claim:
    other = "depth" if along == "width" else "width"
    label = QUANTITIES[name]
    moment = "at initialisation" if name == "entropy_initial" else "after training"
    estimates = [(f"{other} {f['at']}", f[name].power_law.exponent) for f in fits
                 if f["along"] == along and f[name] is not None]
    return sign_claim(f"The NTK entropy {moment} ({label}) rises with {along} at every {other} (prediction stated "
                      "before the runs, after Tovey et al. 2024's phase diagram).", estimates, expected=1,
                      quantity=f"b of {label} ∝ {along}^b", groups=f"{other}s")


def _mechanism_claim(grid: PhaseGrid) -> Claim:
    paper = ("Information compression (ΔS < 0) in small networks, structure formation (ΔS > 0) in large and deep ones "
             "(Tovey et al. 2024, arXiv 2410.07451).")
    smallest = grid.cells.get((grid.widths[0], grid.depths[0]))
    largest = grid.cells.get((grid.widths[-1], grid.depths[-1]))
    cases = [(cell, sign) for cell, sign in ((smallest, -1), (largest, 1)) if cell is not None]
    judged = [(cell, sign) for cell, sign in cases if not math.isnan(cell.estimates["entropy_change"].low)]
    hits = sum(cell.estimates["entropy_change"].sign == sign for cell, sign in judged)
    detail = "; ".join(f"{c.width}×{c.depth}: ΔS = {c.estimates['entropy_change']} over {len(c.runs)} "
                       f"seed{'s' * (len(c.runs) != 1)}"
                       for c, _ in cases) or "neither corner cell has runs"
    return Claim(paper, verdict(hits, len(judged)), f"ΔS has the predicted sign, its interval excluding 0, in {hits} "
                 f"of {len(judged)} judged corner cells, the narrowest-shallowest and the widest-deepest ({detail}).")


def _change_claim(fits: list[dict[str, Any]], along: str) -> Claim:
    other = "depth" if along == "width" else "width"
    estimates = [(f"{other} {f['at']}", f["entropy_change"].slope) for f in fits
                 if f["along"] == along and f["entropy_change"] is not None]
    return sign_claim(f"The entropy change ΔS grows with {along} at every {other}: the larger the network, the more "
                      "structure formation (Tovey et al. 2024).", estimates, expected=1,
                      quantity=f"b of ΔS = a + b ln {along}", groups=f"{other}s")


def _form_claim(fits: list[dict[str, Any]]) -> Claim:
    paper = ("S ≤ ln N bounds any growth of the entropy, so a logarithm describes it at least as well as a power law "
             "(prediction stated before the runs).")
    comparisons = [(f"{QUANTITIES[name]} vs {f['along']} at {'depth' if f['along'] == 'width' else 'width'} "
                    f"{f['at']}", f[name]) for f in fits for name in ENTROPIES
                   if f[name] is not None and f[name].power_law.n_points > 2]
    log_better = [label for label, c in comparisons if c.better == "logarithmic"]
    if not comparisons:
        return Claim(paper, "inconclusive", "no fit has more than two points.")
    power_better = [label for label, c in comparisons if c.better == "power law"]
    against = f"; the power law fits better for {', '.join(power_better)}" if power_better else ""
    return Claim(paper, verdict(len(log_better), len(comparisons)), f"the logarithm has the larger R² in "
                 f"{len(log_better)} of {len(comparisons)} fits with three or more points{against}.")


def _fit_rows(fit: dict[str, Any]) -> list[tuple[str, ...]]:
    common = (fit["along"], f"{'depth' if fit['along'] == 'width' else 'width'} {fit['at']}")
    rows = []
    for name in ENTROPIES:
        c = fit[name]
        if c is not None:
            rows.append((QUANTITIES[name], *common, str(c.power_law.n_points), str(c.power_law.exponent),
                         fmt(c.power_law_r_squared), str(c.logarithmic.slope), fmt(c.logarithmic_r_squared),
                         c.better if c.power_law.n_points > 2 else "— (2 points)"))
    change = fit["entropy_change"]
    if change is not None:
        rows.append(("ΔS", *common, str(change.n_points), "—", "—", str(change.slope), fmt(change.r_squared), "—"))
    return rows


def _notes(grid: PhaseGrid, *, softmax: bool) -> tuple[str, ...]:
    notes = []
    if grid.missing:
        notes.append("Grid points without a run (missing, blank in the figure): "
                     + ", ".join(f"{w}×{d}" for w, d in grid.missing) + ".")
    for kind in ("diverged", "failed"):
        listed = [f"{c.width}×{c.depth} (seeds {', '.join(map(str, getattr(c, kind)))})"
                  for c in grid.cells.values() if getattr(c, kind)]
        if listed:
            notes.append(f"Runs that {kind} are left out of their cell's means: {'; '.join(listed)}.")
    saturated = [f"{c.width}×{c.depth}" for c in grid.cells.values()
                 if c.estimates["loss_final"].value < SATURATED_LOSS]
    if saturated and softmax:
        notes.append(f"Saturated softmax (mean final training loss below {SATURATED_LOSS:g}) in "
                     f"{', '.join(saturated)}: 1 − p of most training points is near or below float32's resolution "
                     "at 1 (6e-8), so after training the NTK of the probabilities (S_T, tr_T) rests on the few "
                     "unsaturated points and on round-off; the NTK of the logits (monitor.outputs: logits) does not "
                     "saturate.")
    empty = [f"{c.width}×{c.depth}" for c in grid.cells.values() if not c.runs]
    if empty:
        notes.append(f"Cells without a finished run (no values): {', '.join(empty)}.")
    seeds = max((len(c.runs) for c in grid.cells.values()), default=0)
    if seeds < 5:
        notes.append(f"At most {seeds} seed{'s' * (seeds != 1)} per cell: the percentile intervals take few distinct "
                     "values; read them as rough.")
    notes.append("Conventions: S is the von Neumann entropy of Θ/tr Θ, not divided by ln N (the authors'; "
                 "results.csv's effective_entropy columns hold S/ln N); tr/N sums the kernel over the outputs, so the "
                 "authors' output-averaged trace is tr/(N·K) for K outputs: the same ranking.")
    return tuple(notes)


def _heat_maps(grid: PhaseGrid, path: pathlib.Path) -> pathlib.Path:
    from matplotlib import colors, ticker

    fig, axes = subplots(2, 3, panel=(5.2, 3.6))
    entropy_norm = _linear_norm(colors, grid.matrix("entropy_initial"), grid.matrix("entropy_final"))
    trace_norm = _log_norm(colors, grid.matrix("trace_initial"), grid.matrix("trace_final"))
    change = grid.matrix("entropy_change")
    reach = float(np.nanmax(np.abs(change))) if np.isfinite(change).any() else 1.0
    panels = (("entropy_initial", "S₀: entropy at initialisation", entropy_norm, "viridis", "{:.2f}"),
              ("entropy_final", "S_T: entropy after training", entropy_norm, "viridis", "{:.2f}"),
              ("entropy_change", "ΔS = S_T − S₀", colors.CenteredNorm(0.0, reach or 1.0), "RdBu_r", "{:+.2f}"),
              ("trace_initial", "tr₀/N: mean diagonal at initialisation", trace_norm, "magma", None),
              ("trace_final", "tr_T/N: mean diagonal after training", trace_norm, "magma", None),
              ("loss_final", "final training loss", _log_norm(colors, grid.matrix("loss_final")), "cividis", None))
    for ax, (name, title, norm, cmap, spec) in zip(axes.ravel(), panels, strict=True):
        values = grid.matrix(name)
        if isinstance(norm, colors.LogNorm):
            values = np.where(values > 0, values, np.nan)
        mesh = ax.pcolormesh(_edges(grid.widths), _edges(grid.depths),
                             np.ma.masked_invalid(values), cmap=cmap, norm=norm)
        fig.colorbar(mesh, ax=ax)
        for (width, depth), cell in grid.cells.items():
            value = cell.estimates[name].value
            text = ("n/a" if math.isnan(value) else spec.format(value) if spec else _compact(value)) + (
                f"†{len(cell.diverged)}" if cell.diverged else "")
            ax.text(width, depth, text, ha="center", va="center", fontsize=6,
                    bbox={"boxstyle": "round,pad=0.1", "facecolor": "white", "alpha": 0.6, "lw": 0})
        ax.set(xscale="log", yscale="log", xlabel="hidden width", ylabel="depth (hidden layers)", title=title)
        ax.set_xticks(grid.widths, [str(w) for w in grid.widths])
        ax.set_yticks(grid.depths, [str(d) for d in grid.depths])
        ax.xaxis.set_minor_locator(ticker.NullLocator())
        ax.yaxis.set_minor_locator(ticker.NullLocator())
    return save(fig, path)


def _fit_lines(grid: PhaseGrid, fits: list[dict[str, Any]], path: pathlib.Path) -> pathlib.Path:
    import matplotlib

    fig, axes = subplots(3, 2, panel=(4.6, 3.2))
    for column, along in enumerate(("width", "depth")):
        other = "depth" if along == "width" else "width"
        lines = [f for f in fits if f["along"] == along]
        palette = matplotlib.colormaps["viridis"](np.linspace(0, 0.9, len(lines)))
        for row, name in enumerate((*ENTROPIES, "entropy_change")):
            ax = axes[row, column]
            for colour, fit in zip(palette, lines, strict=True):
                cells = sorted((c for c in grid.cells.values() if getattr(c, other) == fit["at"] and c.runs),
                               key=lambda c: getattr(c, along))
                x = np.array([getattr(c, along) for c in cells], float)
                estimates = [c.estimates[name] for c in cells]
                mean = np.array([e.value for e in estimates])
                error = np.vstack([np.nan_to_num(mean - [e.low for e in estimates]),
                                   np.nan_to_num([e.high for e in estimates] - mean)])
                ax.errorbar(x, mean, yerr=error, color=colour, marker="o", ms=3, ls="none", capsize=2,
                            label=f"{other} {fit['at']}")
                curve = fit[name]
                if curve is not None and x.size:
                    law = curve if isinstance(curve, LogFit) else (
                        curve.logarithmic if curve.better == "logarithmic" else curve.power_law)
                    dense = np.geomspace(x.min(), x.max(), 50)
                    ax.plot(dense, law.predict(dense), color=colour, ls="--", lw=0.8)
            if name == "entropy_change":
                ax.axhline(0, color="black", lw=0.6)
            ax.set(xscale="log", xlabel=f"hidden {along}" if along == "width" else "depth (hidden layers)",
                   ylabel=QUANTITIES[name], title=f"{QUANTITIES[name]} against {along} (dashed: "
                   f"{'logarithm' if name == 'entropy_change' else 'the better fit'})")
            ax.legend(fontsize=6)
    return save(fig, path)


def _edges(values: tuple[int, ...]) -> np.ndarray:
    """Cell boundaries on a logarithmic axis around sorted positive ``values``: geometric midpoints between
    neighbours, the outer ones mirrored (a factor e^±½ around a single value)."""
    v = np.log(np.asarray(values, float))
    if v.size == 1:
        return np.exp(v[0] + np.array([-0.5, 0.5]))
    middle = (v[1:] + v[:-1]) / 2
    return np.exp(np.concatenate([[2 * v[0] - middle[0]], middle, [2 * v[-1] - middle[-1]]]))


def _compact(value: float) -> str:
    """Two significant digits with a short exponent: ``0.36``, ``12``, ``0.0039``, ``3.2e-9``, ``1.5e2``."""
    mantissa, _, exponent = f"{value:.2g}".partition("e")
    return f"{mantissa}e{int(exponent)}" if exponent else mantissa


def _linear_norm(colors: Any, *matrices: np.ndarray) -> Any:
    finite = np.concatenate([m[np.isfinite(m)] for m in matrices])
    return colors.Normalize(float(finite.min()), float(finite.max())) if finite.size else colors.Normalize(0, 1)


def _log_norm(colors: Any, *matrices: np.ndarray) -> Any:
    positive = np.concatenate([m[np.isfinite(m) & (m > 0)] for m in matrices])
    return colors.LogNorm(float(positive.min()), float(positive.max())) if positive.size else colors.Normalize(0, 1)
