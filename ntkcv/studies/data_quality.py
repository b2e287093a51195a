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
from collections.abc import Callable
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
    for n, members in by_size(rows):
        finished = [row for row in members if _rows.status(row) == "complete"]
        entropy, trace, accuracy = (np.array([_rows.number(row, c) for row in finished]) for c in _COLUMNS)
        sizes.append({"n": n, "subsets": len(finished), "diverged": len(members) - len(finished),
                      **correlations(entropy, trace, accuracy)})
    table = Table("Spearman ρ with the final test accuracy over random training subsets (bootstrap 95% CI)",
                  ("n", "subsets", *TABLE_HEADER),
                  tuple((str(s["n"]), str(s["subsets"]), *table_cells(s)) for s in sizes))
    notes = tuple(f"n={s['n']}: {s['diverged']} runs diverged or failed and are left out." for s in sizes
                  if s["diverged"])
    return Findings("data_quality", "Collective variables at initialisation vs test accuracy", claims(sizes),
                    (table,), notes, {"sizes": sizes})


def figures(rows: list[dict[str, Any]], out_dir: pathlib.Path, *, sweep_dir: pathlib.Path | None = None
            ) -> list[pathlib.Path]:
    """``data_quality_scatter.png``: test accuracy against the initial entropy (left) and trace (right),
    one colour per training-set size, with ρ in the legend."""
    fig, axes = subplots(1, 2, panel=(5, 4))
    for n, members in by_size(rows):
        finished = [row for row in members if _rows.status(row) == "complete"]
        entropy, trace, accuracy = (np.array([_rows.number(row, c) for row in finished]) for c in _COLUMNS)
        scatter_size(axes[0], n, entropy, trace, accuracy, ylabel="final test accuracy")
    return [save(fig, pathlib.Path(out_dir) / "data_quality_scatter.png")]


# --- the pieces the authors'-protocol study (data_quality_authors) shares ----------------------------------------

TABLE_HEADER = ("ρ(S₀/ln n, acc) [95% CI]", "ρ(tr Θ₀, acc) [95% CI]", "test acc. mean [min, max]")
"""The columns of :func:`table_cells`."""


def by_size(rows: list[dict[str, Any]], size: Callable[[dict[str, Any]], int | str] = _rows.train_size
            ) -> list[tuple[int | str, list[dict[str, Any]]]]:
    """``rows`` grouped by training-set size (``size(row)``, default :func:`ntkcv.studies._rows.train_size`),
    sizes ascending."""
    return sorted(_rows.group(rows, size).items(), key=lambda item: _rows.size_order(item[0]))


def correlations(entropy: np.ndarray, trace: np.ndarray, accuracy: np.ndarray) -> dict[str, Any]:
    """Per subset of one size, the initial entropy, the initial trace and the test accuracy → ``entropy_rho``
    and ``trace_rho`` (Spearman's ρ with the accuracy, :func:`~ntkcv.studies._stats.spearman_ci`) and
    ``accuracy_mean``, ``accuracy_min``, ``accuracy_max`` (of the finite accuracies; NaN without any)."""
    reached = accuracy[np.isfinite(accuracy)]
    return {"entropy_rho": spearman_ci(entropy, accuracy), "trace_rho": spearman_ci(trace, accuracy),
            "accuracy_mean": float(reached.mean()) if reached.size else np.nan,
            "accuracy_min": float(reached.min()) if reached.size else np.nan,
            "accuracy_max": float(reached.max()) if reached.size else np.nan}


def table_cells(size: dict[str, Any]) -> tuple[str, ...]:
    """The :data:`TABLE_HEADER` cells of one size's :func:`correlations`."""
    return (str(size["entropy_rho"]), str(size["trace_rho"]),
            f"{fmt(size['accuracy_mean'])} [{fmt(size['accuracy_min'])}, {fmt(size['accuracy_max'])}]")


def claims(sizes: list[dict[str, Any]]) -> tuple[Claim, Claim]:
    """The paper's two claims, judged per size from the sizes' ``entropy_rho`` and ``trace_rho``."""
    return tuple(_claim(paper, sizes, key) for paper, key in (
        ("The entropy of the NTK at initialisation, on the training data, correlates positively with the test "
         "accuracy after training (Tovey et al. 2023, arXiv 2305.00995).", "entropy_rho"),
        ("The trace of the NTK at initialisation, on the training data, correlates positively with the test "
         "accuracy after training (Tovey et al. 2023).", "trace_rho"),
    ))


def scatter_size(axes: Any, n: int | str, entropy: np.ndarray, trace: np.ndarray, accuracy: np.ndarray, *,
                 ylabel: str) -> None:
    """One size's points: ``accuracy`` against the initial entropy on ``axes[0]`` and against the initial trace
    (log scale) on ``axes[1]``, labelled ``n=…`` with ρ."""
    panels = ((axes[0], entropy, "initial S/ln n", False), (axes[1], trace, "initial tr Θ", True))
    for ax, x, label, logx in panels:
        scatter(ax, x, accuracy, spearman_ci(x, accuracy), xlabel=label, ylabel=ylabel,
                title=f"{label} vs test accuracy", label=f"n={n}", logx=logx)


_COLUMNS = (ENTROPY, TRACE, ACCURACY)


def _claim(paper: str, sizes: list[dict[str, Any]], key: str) -> Claim:
    estimates = [(f"n={s['n']}", s[key]) for s in sizes if s[key].n >= 3]
    return sign_claim(paper, estimates, expected=1, quantity="ρ")
