r"""Study 6: the lazy regime, how much the NTK moves during training as the network widens.

In the NTK parameterisation, trained by gradient descent for a fixed training time :math:`t = η·\text{steps}`, the
kernel stays near its initial value as the width :math:`w` grows. The relative kernel change

.. math::
   Δ = \frac{\lVert Θ_T - Θ_0 \rVert_F}{\lVert Θ_0 \rVert_F}

(``cv/relative_distance``, the traced NTK on the training points, against its value at step 0) is bounded by
:math:`O(w^{-1/2})` (Lee et al. 2019, arXiv 1902.06720); Dyer & Gur-Ari (2019, arXiv 1909.11304) predict that the
change during training is :math:`O(w^{-1})`. Both assume a step size below the stability threshold
:math:`2/λ_0` of gradient descent, where :math:`λ_0` is the top eigenvalue of the Gauss–Newton matrix
:math:`Θ_{\text{full}}/n` at initialisation (``curvature/ggn_max`` at step 0). Above it, for
:math:`2/λ_0 < η ≲ 4/λ_0` (:math:`12/λ_0` for ReLU), the loss first grows, the curvature falls until it is below
:math:`2/η` and the kernel moves by :math:`O(1)` at every width (the *catapult* phase, Lewkowycz et al. 2020,
arXiv 2003.02218); beyond it gradient descent diverges. Laziness is a matter of scaling (Chizat, Oyallon & Bach
2019, arXiv 1812.07956): the standard parameterisation trained with Adam takes steps of a fixed size in every
weight, which need not move the kernel less as the network widens.

**Prediction** (stated before the runs): with MSE and full-batch gradient descent in the NTK parameterisation at
:math:`η = 0.5 · 2/λ_∞` (lazy) for a fixed number of steps, the exponent :math:`b` of :math:`Δ ∝ w^{b}` has a
bootstrap interval below 0, below :math:`-1/2` (Lee et al.'s bound) and containing :math:`-1` (Dyer & Gur-Ari);
at :math:`η = 1.5 · 2/λ_∞` (catapult) its interval contains 0 or lies above it; for the standard parameterisation
with Adam its interval lies above the lazy arm's. :math:`λ_∞` is the infinite-width kernel's
(``ntkcv.infinite_width_ntk``), which the NTK-parameterised network's initial kernel tends to.

An *arm* is a parameterisation, an optimiser and a learning rate (``model.parameterization``, ``optimizer.name``,
``optimizer.learning_rate``); its runs differ in ``model.widths`` (equal hidden widths :math:`w`) and
``train.seed``. Each run's *regime* comes from its own :math:`ηλ_0` (gradient descent only) and its outcome:
``lazy`` below 2, ``catapult`` from 2 on, ``divergent`` when the final training loss is not finite; runs of other
optimisers are ``adaptive``. Catapult runs above the predicted upper limit (:func:`catapult_limit`: 4, 12 for ReLU)
that did not diverge are counted in a note. An arm's regime is that of most of its runs. The exponent is fitted by
:func:`ntkcv.studies.fit.fit_power_law` to every finite run of the arm, with the seeds as bootstrap groups.

``annotate`` adds, per run, from its store: ``initial_sharpness`` (:math:`λ_0`), ``final_sharpness``
(:math:`λ_T`, at the last firing), ``eta_lambda`` (:math:`ηλ_0`, NaN for optimisers other than ``sgd``) and
``loss_peak`` (the largest training loss over the first one; above 1 in a catapult).

``values`` of the findings: ``arms``, a list of dicts with ``label``, ``parameterization``, ``optimizer``,
``learning_rate``, ``regime``, ``fit`` (a :class:`~ntkcv.studies.fit.PowerLawFit`, or None with fewer than two
widths), ``fit_narrower`` (the same without the widest width: how much the exponent rests on it), ``widths`` (per
width: ``width``, ``seeds``, ``kernel_change`` (an :class:`~ntkcv.studies._stats.Estimate`), ``eta_lambda``
(mean), ``regimes`` (regime → runs), ``sharpness_ratio`` (mean :math:`λ_T/λ_0`), ``loss_peak`` and
``final_loss`` (means)) and ``runs`` (per run: ``run_id``, ``width``, ``seed``, ``eta_lambda``, ``regime``,
``kernel_change``, ``limit`` (:func:`catapult_limit`), ``sharpness_ratio``, ``loss_peak``, ``final_loss``).
"""

from __future__ import annotations

import collections
import math
import pathlib
from typing import Any

import numpy as np

from ntkcv.studies import _rows
from ntkcv.studies._findings import Claim, Findings, Table, Verdict, fmt
from ntkcv.studies._plots import save, subplots
from ntkcv.studies._stats import finite_mean, mean_ci
from ntkcv.studies.fit import PowerLawFit, exponent_claim, fit_power_law

#: The predicted exponents of the kernel change against width in the lazy regime.
PREDICTIONS = {"Lee et al. 2019 bound": -0.5, "Dyer & Gur-Ari 2019": -1.0}
KERNEL_CHANGE = "relative_distance.final"


def annotate(rows: list[dict[str, Any]], sweep_dir: pathlib.Path) -> list[dict[str, Any]]:
    """The rows with each run's ``initial_sharpness``, ``final_sharpness``, ``eta_lambda`` and ``loss_peak`` (module
    doc), read from its HDF5 store."""
    from ntkcv.report import read_scalars

    annotated = []
    for row in rows:
        store = pathlib.Path(sweep_dir) / "runs" / row["run_id"] / "ntkcv.h5"
        series = read_scalars(store) if store.is_file() else {}
        rate = _rows.setting(row, "optimizer.learning_rate") if _rows.setting(row, "optimizer.name") == "sgd" else None
        annotated.append({**row, **summarise(series, rate)})
    return annotated


def summarise(series: dict[str, tuple[np.ndarray, np.ndarray]], learning_rate: float | None) -> dict[str, float]:
    """One run's ``initial_sharpness``, ``final_sharpness``, ``eta_lambda`` (NaN when ``learning_rate`` is None: not
    gradient descent) and ``loss_peak`` from its scalar series; NaN for what a series is missing."""
    summary = dict.fromkeys(("initial_sharpness", "final_sharpness", "eta_lambda", "loss_peak"), math.nan)
    if "curvature/ggn_max" in series:
        _, ggn = series["curvature/ggn_max"]
        summary.update(initial_sharpness=float(ggn[0]), final_sharpness=float(ggn[-1]))
        if learning_rate is not None:
            summary["eta_lambda"] = float(learning_rate * ggn[0])
    if "train/loss" in series:
        _, loss = series["train/loss"]
        finite = loss[np.isfinite(loss)]
        summary["loss_peak"] = float(np.max(finite) / loss[0]) if finite.size and loss[0] > 0 else math.nan
    return summary


def regime(eta_lambda: float, *, diverged: bool = False) -> str:
    """``divergent`` (``diverged``: the final training loss is not finite), ``adaptive`` (ηλ₀ NaN: not gradient
    descent, or no sharpness logged), ``lazy`` (ηλ₀ < 2) or ``catapult`` (ηλ₀ ≥ 2)."""
    if diverged:
        return "divergent"
    if math.isnan(eta_lambda):
        return "adaptive"
    return "lazy" if eta_lambda < 2 else "catapult"


def catapult_limit(activation: str) -> float:
    """The ηλ₀ above which gradient descent is predicted to diverge instead of catapulting (Lewkowycz et al. 2020):
    12 for ReLU networks, about 4 for the others."""
    return 12.0 if activation == "relu" else 4.0


def analyse(rows: list[dict[str, Any]]) -> Findings:
    """Per arm and width the kernel change with its interval, the fitted exponent per arm and the claims (module
    doc)."""
    _rows.require(rows, KERNEL_CHANGE, "log the drift (monitor.drift: true) on the training probes alone")
    _rows.require(rows, "eta_lambda", "annotate the rows first (a sweep with monitor.curvature: true)")
    failed = [r for r in rows if _rows.status(r) == "failed"]
    rows = [r for r in rows if _rows.status(r) != "failed"]
    arms = [_arm(key, members) for key, members in sorted(_rows.group(rows, _arm_key).items(), key=_arm_order)]
    lazy = [a for a in arms if a["regime"] == "lazy" and a["fit"] is not None]
    catapult = [a for a in arms if a["regime"] == "catapult" and a["fit"] is not None]
    adaptive = [a for a in arms if a["regime"] == "adaptive" and a["fit"] is not None]
    claims = (_vanishing_claim(lazy), _rate_claim(lazy), _catapult_claim(catapult), _adaptive_claim(adaptive, lazy))
    tables = (
        Table("Relative kernel change ‖Θ_T − Θ₀‖_F / ‖Θ₀‖_F per arm and width: means over seeds with bootstrap 95% "
              "intervals; ηλ₀ from each run's initial Gauss–Newton sharpness λ₀",
              ("arm", "width", "seeds", "ηλ₀", "regimes", "kernel change", "λ_T / λ₀", "loss peak / initial",
               "final loss"),
              tuple((a["label"], str(w["width"]), str(w["seeds"]), fmt(w["eta_lambda"], ".2f"),
                     ", ".join(f"{name} {count}" for name, count in w["regimes"].items()),
                     w["kernel_change"].format(".4g"), fmt(w["sharpness_ratio"], ".3f"), fmt(w["loss_peak"], ".2f"),
                     fmt(w["final_loss"], ".4f")) for a in arms for w in a["widths"])),
        Table("Power law Δ ∝ width^b fitted per arm (log–log least squares; interval: bootstrap over seeds)",
              ("arm", "regime", "exponent b", "prefactor", "R²", "points", "b without the widest width"),
              tuple((a["label"], a["regime"], _exponent(a["fit"]), _fit_number(a["fit"], "prefactor", ".3g"),
                     _fit_number(a["fit"], "r_squared", ".3f"), str(a["fit"].n_points if a["fit"] else 0),
                     _exponent(a["fit_narrower"])) for a in arms)),
    )
    notes = ["ηλ₀ < 2: lazy; ηλ₀ ≥ 2: catapult (predicted up to ηλ₀ ≈ 4, 12 for ReLU); a non-finite final loss: "
             "divergent. 'loss peak / initial' above 1 is the catapult's rise, λ_T / λ₀ below 1 its fall in "
             "curvature."]
    for a in arms:
        strays = [r for r in a["runs"] if r["regime"] != a["regime"]]
        if strays:
            notes.append(f"{a['label']} ({a['regime']}): " + "; ".join(
                f"width {r['width']} seed {r['seed']} was {r['regime']} (ηλ₀ = {fmt(r['eta_lambda'], '.2f')})"
                for r in strays) + ".")
        beyond = [r for r in a["runs"] if r["regime"] == "catapult" and r["eta_lambda"] > r["limit"]]
        if beyond:
            listed = "; ".join(f"width {r['width']} seed {r['seed']}: ηλ₀ = {r['eta_lambda']:.2f}" for r in beyond)
            notes.append(f"{a['label']}: {len(beyond)} run{'s' * (len(beyond) != 1)} converged above the predicted "
                         f"limit ηλ₀ ≈ {beyond[0]['limit']:g} ({listed}).")
    seeds = max((a["fit"].exponent.n for a in arms if a["fit"] is not None), default=0)
    if 0 < seeds < 5:
        notes.append(f"The exponents' intervals resample {seeds} seeds, so they take few distinct values: read them "
                     "as rough.")
    if failed:
        notes.append(f"{len(failed)} runs failed (an error, see results.csv) and are left out.")
    return Findings("lazy_regime", "The lazy regime: kernel change against width", claims, tables, tuple(notes),
                    {"arms": arms})


def figures(rows: list[dict[str, Any]], out_dir: pathlib.Path, *, sweep_dir: pathlib.Path | None = None
            ) -> list[pathlib.Path]:
    """``lazy_regime.png``: left, the kernel change against width on log–log axes per arm (seeds as dots, means
    with intervals, the fitted power law dashed, slopes −1/2 and −1 dotted); right, each run's ηλ₀ against width with
    the predicted catapult window 2 ≤ ηλ₀ ≤ 4 shaded."""
    del sweep_dir
    arms = analyse(rows).values["arms"]
    import matplotlib
    from matplotlib import ticker

    fig, axes = subplots(1, 2, panel=(4.6, 3.6))
    left, right = axes[0]
    colours = matplotlib.colormaps["tab10"].colors
    for i, arm in enumerate(arms):
        colour = colours[i % len(colours)]
        runs = [r for r in arm["runs"] if math.isfinite(r["kernel_change"]) and r["kernel_change"] > 0]
        left.scatter([r["width"] for r in runs], [r["kernel_change"] for r in runs], s=10, alpha=0.4, color=colour)
        widths = [w for w in arm["widths"] if not math.isnan(w["kernel_change"].value)]
        x = np.array([w["width"] for w in widths], float)
        mean = np.array([w["kernel_change"].value for w in widths])
        low = np.array([w["kernel_change"].low for w in widths])
        high = np.array([w["kernel_change"].high for w in widths])
        error = np.vstack([np.nan_to_num(mean - low), np.nan_to_num(high - mean)])
        label = f"{arm['label']} ({arm['regime']})"
        if arm["fit"] is not None:
            label += f": b = {arm['fit'].exponent.value:+.2f}"
            left.plot(x, arm["fit"].predict(x), color=colour, ls="--", lw=1)
        left.errorbar(x, mean, yerr=error, color=colour, marker="o", ms=4, lw=0, elinewidth=1, capsize=2, label=label)
        gd = [r for r in arm["runs"] if not math.isnan(r["eta_lambda"])]
        if gd:
            right.scatter([r["width"] for r in gd], [r["eta_lambda"] for r in gd], s=14, color=colour, label=label)
    lazy = next((a for a in arms if a["regime"] == "lazy" and a["fit"] is not None), None)
    if lazy is not None:
        x = np.array(sorted({r["width"] for r in lazy["runs"]}), float)
        for slope, style in ((-0.5, ":"), (-1.0, "-.")):
            anchor = lazy["fit"].predict(x[:1])[0]
            left.plot(x, anchor * (x / x[0]) ** slope, color="grey", ls=style, lw=1, label=f"slope {slope:g}")
    left.set(xscale="log", yscale="log", xlabel="hidden width", ylabel="‖Θ_T − Θ₀‖_F / ‖Θ₀‖_F",
             title="Kernel change after a fixed training time")
    left.legend(fontsize=6)
    right.axhspan(2, catapult_limit("tanh"), color="orange", alpha=0.15, label="predicted catapult window")
    right.axhline(2, color="black", lw=0.8, ls="--")
    right.set(xscale="log", xlabel="hidden width", ylabel="η λ₀ (λ₀: initial Gauss–Newton sharpness)",
              title="Each run's regime")
    right.legend(fontsize=6)
    widths = sorted({r["width"] for arm in arms for r in arm["runs"]})
    for ax in (left, right):
        ax.set_xticks(widths, [str(w) for w in widths])
        ax.xaxis.set_minor_locator(ticker.NullLocator())
    return [save(fig, out_dir / "lazy_regime.png")]


def _arm_key(row: dict[str, Any]) -> tuple[str, str, float]:
    return (_rows.setting(row, "model.parameterization") or "standard", _rows.setting(row, "optimizer.name"),
            float(_rows.setting(row, "optimizer.learning_rate")))


def _arm_order(item: tuple[tuple[str, str, float], list]) -> tuple[int, float]:
    (parameterization, _, rate), _ = item
    return (0 if parameterization == "ntk" else 1, rate)


def _width(row: dict[str, Any]) -> int:
    widths = _rows.setting(row, "model.widths") or ()
    return int(widths[0]) if widths else 0


def _arm(key: tuple[str, str, float], members: list[dict[str, Any]]) -> dict[str, Any]:
    parameterization, optimizer, rate = key
    runs = []
    for row in members:
        diverged = _rows.status(row) == "diverged"
        eta_lambda = _rows.number(row, "eta_lambda")
        change = math.nan if diverged else _rows.number(row, KERNEL_CHANGE)
        runs.append({"run_id": row["run_id"], "width": _width(row), "seed": _rows.setting(row, "train.seed"),
                     "eta_lambda": eta_lambda, "kernel_change": change,
                     "regime": regime(eta_lambda, diverged=diverged),
                     "limit": catapult_limit(_rows.setting(row, "model.activation") or "tanh"),
                     "sharpness_ratio": _rows.number(row, "final_sharpness") / _rows.number(row, "initial_sharpness"),
                     "loss_peak": _rows.number(row, "loss_peak"),
                     "final_loss": math.nan if diverged else _rows.number(row, "train.loss.final")})
    counts = collections.Counter(r["regime"] for r in runs)
    widths = []
    for width in sorted({r["width"] for r in runs}):
        at = [r for r in runs if r["width"] == width]
        widths.append({"width": width, "seeds": len(at), "kernel_change": mean_ci([r["kernel_change"] for r in at]),
                       "eta_lambda": finite_mean([r["eta_lambda"] for r in at]),
                       "regimes": dict(collections.Counter(r["regime"] for r in at)),
                       **{name: finite_mean([r[name] for r in at])
                          for name in ("sharpness_ratio", "loss_peak", "final_loss")}})
    widest = max(r["width"] for r in runs)
    step = f"η = {rate:.3g}" if optimizer == "sgd" else f"{rate:g}"
    return {"label": f"{parameterization} + {optimizer}({step})", "parameterization": parameterization,
            "optimizer": optimizer, "learning_rate": rate, "regime": counts.most_common(1)[0][0], "fit": _fit(runs),
            "fit_narrower": _fit([r for r in runs if r["width"] < widest]),
            "widths": widths, "runs": runs}


def _fit(runs: list[dict[str, Any]]) -> PowerLawFit | None:
    """The power law fitted to the runs with a positive, finite kernel change (seeds as groups); None with fewer than
    two widths."""
    usable = [r for r in runs if math.isfinite(r["kernel_change"]) and r["kernel_change"] > 0]
    if len({r["width"] for r in usable}) < 2:
        return None
    return fit_power_law([r["width"] for r in usable], [r["kernel_change"] for r in usable],
                         groups=[r["seed"] for r in usable])


def _describe(arm: dict[str, Any]) -> str:
    regimes = collections.Counter(r["regime"] for r in arm["runs"])
    counted = ", ".join(f"{count} {name}" for name, count in regimes.items())
    return f"{arm['label']}, widths {_span(arm)}, runs: {counted}"


def _span(arm: dict[str, Any]) -> str:
    widths = [w["width"] for w in arm["widths"]]
    return f"{min(widths)}–{max(widths)}"


def _vanishing_claim(lazy: list[dict[str, Any]]) -> Claim:
    paper = ("In the NTK parameterisation under gradient descent below the stability threshold (ηλ₀ < 2), the "
             "relative kernel change after a fixed training time vanishes with width, at least as fast as "
             "width^(−1/2) (Lee et al. 2019, arXiv 1902.06720).")
    if not lazy:
        return Claim(paper, "inconclusive", "no arm in the lazy regime with two or more widths.")
    judged = _judged(lazy)
    faster = sum(a["fit"].exponent.high <= PREDICTIONS["Lee et al. 2019 bound"] for a in judged)
    falling = sum(a["fit"].exponent.high < 0 for a in judged)
    outcome: Verdict = ("inconclusive" if not judged else "reproduced" if faster == len(judged)
                        else "partly reproduced" if falling else "not reproduced")
    evidence = "; ".join(f"{_describe(a)}: exponent b = {a['fit'].exponent}" for a in lazy)
    return Claim(paper, outcome, f"the exponent's interval lies below 0 in {falling} and below −1/2 in {faster} of "
                 f"{len(judged)} lazy arms with an interval ({evidence}).")


def _rate_claim(lazy: list[dict[str, Any]]) -> Claim:
    paper = ("During training in the lazy regime the kernel changes as width^(−1) (Dyer & Gur-Ari 2019, "
             "arXiv 1909.11304).")
    if not lazy:
        return Claim(paper, "inconclusive", "no arm in the lazy regime with two or more widths.")
    judged = _judged(lazy)
    prediction = PREDICTIONS["Dyer & Gur-Ari 2019"]
    hits = sum(a["fit"].exponent.low <= prediction <= a["fit"].exponent.high for a in judged)
    outcome: Verdict = ("inconclusive" if not judged else "reproduced" if hits == len(judged)
                        else "partly reproduced" if hits else "not reproduced")
    evidence = " ".join(f"{a['label']}: {exponent_claim(a['fit'], PREDICTIONS)} Without width "
                        f"{a['widths'][-1]['width']}: exponent b = {_exponent(a['fit_narrower'])}." for a in lazy)
    return Claim(paper, outcome, evidence)


def _catapult_claim(catapult: list[dict[str, Any]]) -> Claim:
    paper = ("Above the stability threshold (2 < ηλ₀ ≲ 4) gradient descent catapults: the loss rises, the "
             "curvature falls below 2/η and the kernel change does not shrink with width (Lewkowycz et al. 2020, "
             "arXiv 2003.02218).")
    if not catapult:
        return Claim(paper, "inconclusive", "no arm in the catapult regime with two or more widths.")
    judged = _judged(catapult)
    held = sum(a["fit"].exponent.high >= 0 for a in judged)
    outcome: Verdict = ("inconclusive" if not judged else "reproduced" if held == len(judged)
                        else "partly reproduced" if held else "not reproduced")
    evidence = "; ".join(
        f"{_describe(a)}, ηλ₀ {_range([r['eta_lambda'] for r in a['runs']])}: exponent b = {a['fit'].exponent}, "
        f"mean λ_T/λ₀ = "
        f"{fmt(finite_mean([r['sharpness_ratio'] for r in a['runs']]), '.3f')} (2/(ηλ₀) = "
        f"{fmt(finite_mean([2 / r['eta_lambda'] for r in a['runs']]), '.3f')}), mean loss peak / initial = "
        f"{fmt(finite_mean([r['loss_peak'] for r in a['runs']]), '.2f')}" for a in catapult)
    return Claim(paper, outcome, f"the exponent's interval reaches 0 or above in {held} of {len(judged)} catapult "
                 f"arms with an interval ({evidence}).")


def _adaptive_claim(adaptive: list[dict[str, Any]], lazy: list[dict[str, Any]]) -> Claim:
    paper = ("Laziness is a matter of scaling (Chizat, Oyallon & Bach 2019, arXiv 1812.07956): in the standard "
             "parameterisation trained with Adam the kernel change does not vanish with width as in the lazy arm.")
    if not adaptive or not lazy:
        return Claim(paper, "inconclusive", "needs an adaptive arm and a lazy arm, each with two or more widths.")
    reference = lazy[0]["fit"].exponent
    above = sum(a["fit"].exponent.low > reference.high for a in adaptive)
    below = sum(a["fit"].exponent.high < reference.low for a in adaptive)
    outcome: Verdict = ("reproduced" if above == len(adaptive) else "not reproduced" if below == len(adaptive)
                        else "partly reproduced" if above else "inconclusive")
    evidence = "; ".join(f"{_describe(a)}: exponent b = {a['fit'].exponent}" for a in adaptive)
    return Claim(paper, outcome, f"the exponent's interval lies above the lazy arm's ({lazy[0]['label']}: "
                 f"{reference}) in {above} of {len(adaptive)} adaptive arms ({evidence}).")


def _range(values: list[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    return f"{min(finite):.2f}–{max(finite):.2f}" if finite else "n/a"


def _judged(arms: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The arms whose exponent has an interval (two or more seeds)."""
    return [a for a in arms if not math.isnan(a["fit"].exponent.low)]



def _exponent(fit: PowerLawFit | None) -> str:
    return "n/a" if fit is None else str(fit.exponent)


def _fit_number(fit: PowerLawFit | None, name: str, spec: str) -> str:
    return "n/a" if fit is None else fmt(getattr(fit, name), spec)
