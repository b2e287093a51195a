r"""Study 4: do data-free weight-spectrum exponents track the test accuracy?

Martin & Mahoney (arXiv 1901.08278; Martin, Peng & Mahoney 2021) fit a power law :math:`ρ(λ) ∝ λ^{-α}` to
each layer's eigenvalues of :math:`W^⊤W/N` and find that smaller α, and smaller weighted
:math:`\hat α = α \log_{10} λ_{\max}`, go with a higher test accuracy across a series of trained models:
no data is needed to rank them. This study reads the layer means ``weights/alpha`` and
``weights/alpha_weighted`` (see :func:`ntkcv.cv.weight_spectra`) at the end of each run of the
time-evolution sweep and reports Spearman's ρ with the final test accuracy, with a paired bootstrap 95%
interval, within each group of runs that differ only in architecture and seed (same loss, optimiser and
``n``: a series of models, as in the paper) and over all runs. The claim holds in a group when the interval
of ρ lies below 0. Layers with fewer than 10 non-zero eigenvalues (width < 10) have no fit; a run with none
has no α and is left out (counted in the table).

``values`` of the findings: ``groups``, a list of dicts with ``group``, ``runs`` (with an α),
``without_fit``, ``alpha_rho`` and ``alpha_weighted_rho`` (:class:`~ntkcv.studies._stats.Estimate`);
``overall``, the same over every run.
"""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

from ntkcv.studies import _rows
from ntkcv.studies._findings import Findings, Table, sign_claim
from ntkcv.studies._plots import save, scatter, subplots
from ntkcv.studies._stats import spearman_ci

ALPHA, ALPHA_WEIGHTED, ACCURACY = "weights.alpha.final", "weights.alpha_weighted.final", "train.test_accuracy.final"


def analyse(rows: list[dict[str, Any]]) -> Findings:
    """Spearman's ρ of α and α̂ at the end of training with the test accuracy, per group and overall."""
    _rows.require(rows, ALPHA, "log it with monitor.weight_metrics: true")
    groups = [_group(f"{training}, n={n}", members) for (training, n), members in
              _rows.group(rows, lambda r: (_rows.training(r), _rows.train_size(r))).items()]
    overall = _group("all runs", rows)
    claims = tuple(
        sign_claim(paper, [(g["group"], g[key]) for g in groups if g[key].n >= 3], expected=-1, quantity="ρ",
                   groups="groups of models")
        for paper, key in (
            ("A smaller power-law exponent α of the weight spectra goes with a higher test accuracy (Martin & "
             "Mahoney 2019, arXiv 1901.08278).", "alpha_rho"),
            ("A smaller weighted exponent α̂ = α log10 λ_max goes with a higher test accuracy (Martin, Peng & "
             "Mahoney 2021).", "alpha_weighted_rho"),
        ))
    table = Table("Spearman ρ of the final weight-spectrum exponents with the final test accuracy (95% CI); "
                  "the paper's claim is ρ < 0",
                  ("group", "runs with α", "no fitted layer", "ρ(α, acc) [95% CI]", "ρ(α̂, acc) [95% CI]"),
                  tuple((g["group"], str(g["runs"]), str(g["without_fit"]), str(g["alpha_rho"]),
                         str(g["alpha_weighted_rho"])) for g in [*groups, overall]))
    return Findings("weight_spectra", "Weight-spectrum exponents vs test accuracy", claims, (table,), (),
                    {"groups": groups, "overall": overall})


def figures(rows: list[dict[str, Any]], out_dir: pathlib.Path, *, sweep_dir: pathlib.Path | None = None
            ) -> list[pathlib.Path]:
    """``weight_spectra.png``: test accuracy against α (left) and α̂ (right), one colour per group."""
    fig, axes = subplots(1, 2, panel=(5.5, 4.2))
    for (training, n), members in _rows.group(rows, lambda r: (_rows.training(r), _rows.train_size(r))).items():
        finished = [row for row in members if _rows.status(row) == "complete"]
        accuracy = np.array([_rows.number(row, ACCURACY) for row in finished])
        for ax, column, label in ((axes[0, 0], ALPHA, "α"), (axes[0, 1], ALPHA_WEIGHTED, "α̂")):
            x = np.array([_rows.number(row, column) for row in finished])
            scatter(ax, x, accuracy, spearman_ci(x, accuracy), xlabel=f"final mean {label}",
                    ylabel="final test accuracy", title=f"{label} vs test accuracy", label=f"{training}, n={n}")
    return [save(fig, pathlib.Path(out_dir) / "weight_spectra.png")]


def _group(label: str, members: list[dict[str, Any]]) -> dict[str, Any]:
    finished = [row for row in members if _rows.status(row) == "complete"]
    accuracy = np.array([_rows.number(row, ACCURACY) for row in finished])
    alpha, weighted = (np.array([_rows.number(row, c) for row in finished]) for c in (ALPHA, ALPHA_WEIGHTED))
    return {"group": label, "runs": int(np.isfinite(alpha).sum()), "without_fit": int((~np.isfinite(alpha)).sum()),
            "alpha_rho": spearman_ci(alpha, accuracy), "alpha_weighted_rho": spearman_ci(weighted, accuracy)}
