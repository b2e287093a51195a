r"""Study 2: do the NTK's collective variables at initialisation predict the test accuracy after training?

Tovey et al. (arXiv 2305.00995) build the NTK at initialisation on a training set and find that its entropy
and its trace correlate with the test accuracy the network reaches after training on that set. The sweep
trains one fixed initialisation on many random training subsets of each size ``n`` (``data.subset_seed``;
split and test set fixed) and logs the CVs on the training points (``data.probe_set: train``). Per ``n``
it reports Spearman's ρ between the initial effective entropy :math:`S_0/\ln n` (within one ``n`` the
same ranking as :math:`S_0`) and the final test accuracy, and between the initial trace and the test
accuracy, each with a paired bootstrap 95% interval over the subsets. A claim holds at an ``n`` when the
interval lies above 0.

``values`` of the findings: ``sizes``, a list of dicts with ``n``, ``subsets`` (finished runs),
``diverged``, ``entropy_rho`` and ``trace_rho`` (:class:`~ntkcv.studies._stats.Estimate`),
``accuracy_mean``, ``accuracy_min`` and ``accuracy_max``.
"""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

from ntkcv.studies import _rows
from ntkcv.studies._findings import Claim, Findings, Table, fmt, sign_claim
from ntkcv.studies._plots import save, scatter, subplots
from ntkcv.studies._stats import spearman_ci

ENTROPY, TRACE, ACCURACY = "effective_entropy.initial", "trace.initial", "train.test_accuracy.final"


def analyse(rows: list[dict[str, Any]]) -> Findings:
    """Spearman's ρ of the initial entropy and trace with the final test accuracy, per training-set size."""
    _rows.require(rows, ENTROPY, "log it with monitor.cvs: [effective_entropy, trace, …]")
    sizes = []
    for n, members in sorted(_rows.group(rows, _rows.train_size).items(), key=lambda item: _rows.size_order(item[0])):
        finished = [row for row in members if _rows.status(row) == "complete"]
        entropy, trace, accuracy = (np.array([_rows.number(row, c) for row in finished]) for c in _COLUMNS)
        reached = accuracy[np.isfinite(accuracy)]
        sizes.append({"n": n, "subsets": len(finished), "diverged": len(members) - len(finished),
                      "entropy_rho": spearman_ci(entropy, accuracy), "trace_rho": spearman_ci(trace, accuracy),
                      "accuracy_mean": float(reached.mean()) if reached.size else np.nan,
                      "accuracy_min": float(reached.min()) if reached.size else np.nan,
                      "accuracy_max": float(reached.max()) if reached.size else np.nan})
    claims = tuple(_claim(paper, sizes, key) for paper, key in (
        ("The entropy of the NTK at initialisation, on the training data, correlates positively with the test "
         "accuracy after training (Tovey et al. 2023, arXiv 2305.00995).", "entropy_rho"),
        ("The trace of the NTK at initialisation, on the training data, correlates positively with the test "
         "accuracy after training (Tovey et al. 2023).", "trace_rho"),
    ))
    table = Table("Spearman ρ with the final test accuracy over random training subsets (bootstrap 95% CI)",
                  ("n", "subsets", "ρ(S₀/ln n, acc) [95% CI]", "ρ(tr Θ₀, acc) [95% CI]", "test acc. mean [min, max]"),
                  tuple((str(s["n"]), str(s["subsets"]), str(s["entropy_rho"]), str(s["trace_rho"]),
                         f"{fmt(s['accuracy_mean'])} [{fmt(s['accuracy_min'])}, {fmt(s['accuracy_max'])}]")
                        for s in sizes))
    notes = tuple(f"n={s['n']}: {s['diverged']} runs diverged or failed and are left out." for s in sizes
                  if s["diverged"])
    return Findings("data_quality", "Collective variables at initialisation vs test accuracy", claims, (table,),
                    notes, {"sizes": sizes})


def figures(rows: list[dict[str, Any]], out_dir: pathlib.Path, *, sweep_dir: pathlib.Path | None = None
            ) -> list[pathlib.Path]:
    """``data_quality_scatter.png``: test accuracy against the initial entropy (left) and trace (right),
    one colour per training-set size, with ρ in the legend."""
    fig, axes = subplots(1, 2, panel=(5, 4))
    for n, members in sorted(_rows.group(rows, _rows.train_size).items(), key=lambda item: _rows.size_order(item[0])):
        finished = [row for row in members if _rows.status(row) == "complete"]
        entropy, trace, accuracy = (np.array([_rows.number(row, c) for row in finished]) for c in _COLUMNS)
        panels = ((axes[0, 0], entropy, "initial S/ln n", False), (axes[0, 1], trace, "initial tr Θ", True))
        for ax, x, label, logx in panels:
            scatter(ax, x, accuracy, spearman_ci(x, accuracy), xlabel=label, ylabel="final test accuracy",
                    title=f"{label} vs test accuracy", label=f"n={n}", logx=logx)
    return [save(fig, pathlib.Path(out_dir) / "data_quality_scatter.png")]


_COLUMNS = (ENTROPY, TRACE, ACCURACY)


def _claim(paper: str, sizes: list[dict[str, Any]], key: str) -> Claim:
    estimates = [(f"n={s['n']}", s[key]) for s in sizes if s[key].n >= 3]
    return sign_claim(paper, estimates, expected=1, quantity="ρ")
