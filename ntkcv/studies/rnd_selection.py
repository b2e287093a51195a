r"""Study 3: do training sets chosen by random network distillation beat random ones?

Tovey et al. (arXiv 2305.00995) select training sets with RND (:func:`ntkcv.selection.rnd_select`) and find
that they have larger NTK collective variables at initialisation than random sets of the same size and
lead to a higher test accuracy. The sweep trains on an RND set and a random set for every (size ``n``,
seed) pair, with the same seed for the network's initialisation; the seed also seeds both selections. Per
``n`` the study reports the mean over seeds of the paired differences RND − random in the initial
effective entropy, the initial trace and the final test accuracy, each with a bootstrap 95% interval. A
claim holds at an ``n`` when the interval lies above 0.

Which set a run trained on is not part of its config: the experiment records the selections in
``selections.json`` in the sweep's folder and :func:`annotate` labels the rows from it.

``values`` of the findings: ``sizes``, a list of dicts with ``n``, ``pairs`` and, for each of ``entropy``,
``trace`` and ``accuracy``, ``<name>_rnd`` and ``<name>_random`` (means) and ``<name>_difference`` (an
:class:`~ntkcv.studies._stats.Estimate`).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np

from ntkcv.studies import _rows
from ntkcv.studies._findings import Claim, Findings, Table, fmt, sign_claim
from ntkcv.studies._plots import save, subplots
from ntkcv.studies._stats import finite_mean, mean_ci

SELECTIONS = "selections.json"
METHODS = ("rnd", "random")
_QUANTITIES = {"entropy": "effective_entropy.initial", "trace": "trace.initial",
               "accuracy": "train.test_accuracy.final"}


def write_selections(sweep_dir: pathlib.Path, selections: list[dict[str, Any]]) -> pathlib.Path:
    """Record ``selections`` (dicts with ``method``, ``seed``, ``size`` and ``indices``) for :func:`annotate`."""
    path = pathlib.Path(sweep_dir) / SELECTIONS
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([{**s, "indices": [int(i) for i in s["indices"]]} for s in selections]))
    return path


def read_selections(sweep_dir: pathlib.Path) -> dict[tuple[int, ...], dict[str, Any]]:
    """The records of the sweep's ``selections.json`` (:func:`write_selections`) by their ``indices``."""
    path = pathlib.Path(sweep_dir) / SELECTIONS
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the rnd_selection experiments write it with the sweep")
    return {tuple(s["indices"]): s for s in json.loads(path.read_text())}


def annotate(rows: list[dict[str, Any]], sweep_dir: pathlib.Path) -> list[dict[str, Any]]:
    """``rows`` with ``selection`` (``"rnd"`` or ``"random"``) set from the sweep's ``selections.json``."""
    records = read_selections(sweep_dir)
    return [{**row, "selection": records.get(_rows.setting(row, "data.indices") or (), {}).get("method")}
            for row in rows]


def paired_sizes(rows: list[dict[str, Any]], quantities: dict[str, str]
                 ) -> list[tuple[int | str, list[dict[str, dict[str, Any]]], dict[str, dict[str, np.ndarray]]]]:
    """Per training-set size, ascending: the size, its seed pairs (:func:`paired`) and, for each ``name: column`` of
    ``quantities``, the column's values per method over the pairs (``values[name]["rnd"]``, in pair order).

    Raises:
      ValueError: no row is labelled with its selection (:func:`annotate` not called).
    """
    if not any(row.get("selection") in METHODS for row in rows):
        raise ValueError("no row is labelled with its selection ('rnd' or 'random'): call annotate(rows, sweep_dir)")
    sizes = []
    for n, members in sorted(_rows.group(rows, _rows.train_size).items(), key=lambda item: _rows.size_order(item[0])):
        pairs = paired(members)
        values = {name: {method: np.array([_rows.number(pair[method], column) for pair in pairs]) for method in METHODS}
                  for name, column in quantities.items()}
        sizes.append((n, pairs, values))
    return sizes


def analyse(rows: list[dict[str, Any]]) -> Findings:
    """Paired RND − random differences of the initial CVs and the final test accuracy per size."""
    sizes = []
    for n, pairs, values in paired_sizes(rows, _QUANTITIES):
        entry: dict[str, Any] = {"n": n, "pairs": len(pairs)}
        for name, by_method in values.items():
            rnd, rand = by_method["rnd"], by_method["random"]
            entry |= {f"{name}_rnd": finite_mean(rnd), f"{name}_random": finite_mean(rand),
                      f"{name}_difference": mean_ci(rnd - rand)}
        sizes.append(entry)
    claims = (
        _claim("RND selects training sets whose NTK at initialisation has a larger entropy than random sets of the "
               "same size (Tovey et al. 2023, arXiv 2305.00995).", sizes, "entropy"),
        _claim("RND selects training sets whose NTK at initialisation has a larger trace (Tovey et al. 2023).",
               sizes, "trace"),
        _claim("Networks trained on RND-selected sets reach a higher test accuracy than on random sets (Tovey et "
               "al. 2023).", sizes, "accuracy"),
    )
    table = Table("RND vs random training sets: means over seeds and the paired difference RND − random (95% CI)",
                  ("n", "pairs", "S₀/ln n RND", "random", "Δ [95% CI]", "tr Θ₀ RND", "random", "Δ [95% CI]",
                   "test acc. RND", "random", "Δ [95% CI]"),
                  tuple((str(s["n"]), str(s["pairs"]),
                         *(cell for name in _QUANTITIES for cell in (
                             fmt(s[f"{name}_rnd"], ".4g"), fmt(s[f"{name}_random"], ".4g"),
                             str(s[f"{name}_difference"])))) for s in sizes))
    unpaired = sum(1 for row in rows if row.get("selection") in METHODS) - 2 * sum(s["pairs"] for s in sizes)
    notes = (f"{unpaired} runs have no finished partner (diverged or failed) and are left out.",) if unpaired else ()
    return Findings("rnd_selection", "RND vs random data selection", claims, (table,), notes, {"sizes": sizes})


def figures(rows: list[dict[str, Any]], out_dir: pathlib.Path, *, sweep_dir: pathlib.Path | None = None
            ) -> list[pathlib.Path]:
    """``rnd_selection.png``: initial entropy, initial trace and test accuracy against ``n`` for both selections
    (mean and the seeds)."""
    fig, axes = subplots(1, 3, panel=(4, 3.6))
    groups = sorted(_rows.group(rows, _rows.train_size).items(), key=lambda item: _rows.size_order(item[0]))
    for ax, (name, column) in zip(axes[0], _QUANTITIES.items(), strict=True):
        for offset, method in zip((-0.1, 0.1), METHODS, strict=True):
            for i, (_, members) in enumerate(groups):
                values = [_rows.number(r, column) for r in members
                          if r.get("selection") == method and _rows.status(r) == "complete"]
                ax.scatter(np.full(len(values), i + offset), values, s=10, alpha=0.5, color=f"C{METHODS.index(method)}")
                ax.scatter([i + offset], [finite_mean(values)], marker="_", s=300, color=f"C{METHODS.index(method)}",
                           label=method if i == 0 else None)
        ax.set(xticks=range(len(groups)), xticklabels=[n for n, _ in groups], xlabel="training points n",
               title=column, yscale="log" if name == "trace" else "linear")
        ax.legend(fontsize=8)
    return [save(fig, pathlib.Path(out_dir) / "rnd_selection.png")]


def paired(members: list[dict[str, Any]]) -> list[dict[str, dict[str, Any]]]:
    """Finished runs by seed, keeping the seeds with both an RND and a random run."""
    by_seed: dict[Any, dict[str, dict[str, Any]]] = {}
    for row in members:
        if row.get("selection") in METHODS and _rows.status(row) == "complete":
            by_seed.setdefault(_rows.setting(row, "train.seed"), {})[row["selection"]] = row
    return [pair for _, pair in sorted(by_seed.items()) if len(pair) == len(METHODS)]


def _claim(paper: str, sizes: list[dict[str, Any]], name: str) -> Claim:
    estimates = [(f"n={s['n']}", s[f"{name}_difference"]) for s in sizes if s["pairs"] >= 2]
    return sign_claim(paper, estimates, expected=1, quantity="RND − random")
