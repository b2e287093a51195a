r"""Study 2 on the authors' protocol: the initial NTK's entropy and trace against the mean test accuracy of
several trainings per training subset, per size and pooled over sizes.

Tovey et al. (arXiv 2305.00995) drew 30 random subsets of 30 images, built the NTK of one fixed initialisation
on each and trained 5 networks per subset, averaging their test accuracies. The sweep
(``configs/experiments/data_quality_authors.yaml``) does this for several sizes ``n``: every subset
(``data.train_size``, ``data.subset_seed``, on the split of ``data.seed``) is trained with ``train.seed``
0, 1, …; the CVs at initialisation come from the run with ``train.seed`` :data:`CV_SEED` alone (the NTK on the
subset's own points, ``data.probe_set: train``), and the subset's accuracy is the mean of its trainings' final
test accuracies.

Per ``n``: Spearman's ρ of the initial effective entropy :math:`S_0/\ln n` and of the initial trace with the
mean accuracy (:func:`ntkcv.studies.data_quality.correlations`), and the spread of the accuracy over a subset's
trainings (the mean of their standard deviations) beside its spread over subsets (the standard deviation of the
subset means): averaging helps the ranking where the first is not small against the second.

Pooled over sizes the CVs and the accuracy both move with ``n``, so the raw ρ mixes the size effect into the
data-quality effect; the study reports the partial Spearman correlation controlling for ``n``
(:func:`partial_spearman`, ranks within each size) with a bootstrap interval resampling subsets within sizes
(:func:`partial_spearman_ci`). The raw pooled ρ differs between :math:`S_0/\ln n` and the authors' :math:`S_0`
(not divided by :math:`\ln n`), and between :math:`\operatorname{tr}\Theta_0` and the mean diagonal
:math:`\operatorname{tr}\Theta_0/n`; the partial ρ does not, as a size's ranks do not. The authors' NTK was
averaged over the outputs (neural-tangents' ``trace_axes``), ntkcv's sums them: a constant factor that changes
no ranking.

``values`` of the findings: ``sizes``, a list of dicts as :mod:`ntkcv.studies.data_quality`'s (``n``,
``subsets``, ``entropy_rho``, ``trace_rho``, ``accuracy_mean``, ``accuracy_min``, ``accuracy_max``) with
``trainings`` (finished trainings per subset, the most), ``spread_within`` and ``spread_between``; ``pooled``,
``entropy``, ``entropy_raw``, ``trace`` and ``trace_per_point`` → a dict with ``cv`` (its label), ``subsets``,
``raw_rho`` and ``partial_rho`` (:class:`~ntkcv.studies._stats.Estimate`); ``subsets``, :func:`subsets`.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats

from ntkcv.data import DATASET_INFO
from ntkcv.studies import _rows, data_quality
from ntkcv.studies._findings import Claim, Findings, Table, fmt, sign_claim
from ntkcv.studies._plots import save, subplots
from ntkcv.studies._stats import CONFIDENCE, RESAMPLES, SEED, Estimate, spearman_ci

ENTROPY, ENTROPY_RAW, TRACE = "effective_entropy.initial", "entropy.initial", "trace.initial"
ACCURACY = data_quality.ACCURACY
CV_SEED = 0
"""The ``train.seed`` whose run gives every subset's CVs at initialisation (one fixed initialisation)."""


def partial_spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray,
                     groups: Sequence[Any] | np.ndarray) -> float:
    r"""Spearman's ρ of ``x`` and ``y`` controlling for the categorical ``groups`` (the training-set size).

    Within each group :math:`g` the values are ranked (ties averaged) and standardised,
    :math:`z_i = (r_i - \bar r_g) / s_g` (:func:`rank_scores`), which removes whatever depends on the group alone;
    then

    .. math:: \rho_{xy\cdot g} = \frac{\sum_i z_{x,i} z_{y,i}}{\sqrt{\sum_i z_{x,i}^2 \sum_i z_{y,i}^2}}.

    Without ties this is :math:`\sum_g n_g \rho_g / \sum_g n_g`, the mean of the groups' Spearman ρ weighted by
    their sizes, and it does not change when a group's values are transformed monotonically (:math:`S` vs
    :math:`S/\ln n`). A variable that moves with the group alone has :math:`z = 0`. Triples with a non-finite ``x``
    or ``y`` are left out; NaN with fewer than three or without variation within any group.
    """
    x, y, groups = _finite_triples(x, y, groups)
    return float(_partial(x, y, groups)) if x.size >= 3 else math.nan


def partial_spearman_ci(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray,
                        groups: Sequence[Any] | np.ndarray) -> Estimate:
    """:func:`partial_spearman` with a percentile bootstrap 95% interval that resamples the pairs within each
    group (each resample keeps the groups' sizes), seeded as :mod:`ntkcv.studies._stats`'s intervals.

    The interval is NaN where a resample's ρ is undefined (no variation within any group), as
    :func:`~ntkcv.studies._stats.spearman_ci`'s is.
    """
    x, y, groups = _finite_triples(x, y, groups)
    value = float(_partial(x, y, groups)) if x.size >= 3 else math.nan
    if math.isnan(value):
        return Estimate(value, math.nan, math.nan, int(x.size))
    rng = np.random.default_rng(SEED)
    members = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    resamples = np.concatenate([m[rng.integers(0, m.size, (RESAMPLES, m.size))] for m in members], axis=1)
    labels = np.concatenate([groups[m] for m in members])
    rhos = _partial(x[resamples], y[resamples], labels)
    if not np.all(np.isfinite(rhos)):
        return Estimate(value, math.nan, math.nan, int(x.size))
    low, high = np.percentile(rhos, [50 * (1 - CONFIDENCE), 50 * (1 + CONFIDENCE)])
    return Estimate(value, float(low), float(high), int(x.size))


def rank_scores(values: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """The ranks of ``values`` within each group of ``groups`` (one label per position of the last axis; ties
    averaged), minus the group's mean rank, over the group's standard deviation of ranks (0 in a group without
    variation): :func:`partial_spearman`'s :math:`z`."""
    scores = np.zeros(np.shape(values))
    for g in np.unique(groups):
        members = groups == g
        ranks = stats.rankdata(values[..., members], axis=-1)
        ranks -= ranks.mean(-1, keepdims=True)
        spread = np.sqrt((ranks**2).mean(-1, keepdims=True))
        scores[..., members] = np.divide(ranks, spread, out=np.zeros_like(ranks), where=spread > 0)
    return scores


def subsets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    r"""The sweep's subsets (``data.train_size`` × ``data.subset_seed``): dicts with ``n``, ``subset_seed``, the
    CVs of its :data:`CV_SEED` run (``entropy`` = :math:`S_0/\ln n`, ``entropy_raw``, ``trace``; NaN without that
    run), ``accuracies`` (``train.seed`` → final test accuracy of each finished training), ``accuracy`` (their
    mean) and ``runs`` (its runs, finished or not)."""
    found = []
    for (n, subset_seed), members in _rows.group(
            rows, lambda row: (_rows.train_size(row), _rows.setting(row, "data.subset_seed"))).items():
        reference = [row for row in members if _rows.setting(row, "train.seed") == CV_SEED]
        cvs = {name: _rows.number(reference[0], column) if reference else math.nan
               for name, column in (("entropy", ENTROPY), ("entropy_raw", ENTROPY_RAW), ("trace", TRACE))}
        accuracies = {_rows.setting(row, "train.seed"): _rows.number(row, ACCURACY) for row in members
                      if _rows.status(row) == "complete"}
        finite = [a for a in accuracies.values() if math.isfinite(a)]
        found.append({"n": n, "subset_seed": subset_seed, **cvs, "accuracies": accuracies,
                      "accuracy": float(np.mean(finite)) if finite else math.nan, "runs": len(members)})
    return found


def analyse(rows: list[dict[str, Any]]) -> Findings:
    """Per size, ρ of the initial CVs with the mean test accuracy and the accuracy's spreads; pooled, the partial
    ρ controlling for the size."""
    _rows.require(rows, ENTROPY, "log it with monitor.cvs: [entropy, effective_entropy, trace] on the "
                  f"train.seed {CV_SEED} runs")
    found = subsets(rows)
    sizes = []
    for n, members in _by_size(found):
        entropy, trace, accuracy = (np.array([s[key] for s in members]) for key in ("entropy", "trace", "accuracy"))
        spreads = [np.std(list(s["accuracies"].values()), ddof=1) for s in members if len(s["accuracies"]) >= 2]
        means = accuracy[np.isfinite(accuracy)]
        sizes.append({"n": n, "subsets": int(means.size), **data_quality.correlations(entropy, trace, accuracy),
                      "trainings": max(len(s["accuracies"]) for s in members),
                      "spread_within": float(np.mean(spreads)) if spreads else math.nan,
                      "spread_between": float(np.std(means, ddof=1)) if means.size >= 2 else math.nan})
    pooled = _pooled(found)
    claims = (*data_quality.claims(sizes),
              _pooled_claim("Pooled over training-set sizes and controlling for the size, the entropy of the NTK at "
                            "initialisation correlates positively with the test accuracy (Tovey et al. 2023).",
                            pooled["entropy"], sizes),
              _pooled_claim("Pooled over training-set sizes and controlling for the size, the trace of the NTK at "
                            "initialisation correlates positively with the test accuracy (Tovey et al. 2023).",
                            pooled["trace"], sizes))
    per_size = Table("Spearman ρ with the mean final test accuracy of each subset's trainings (bootstrap 95% CI); "
                     "the accuracy's spread over a subset's trainings (mean SD) and over subsets (SD of the means)",
                     ("n", "subsets", "trainings", *data_quality.TABLE_HEADER, "SD over trainings",
                      "SD over subsets"),
                     tuple((str(s["n"]), str(s["subsets"]), str(s["trainings"]), *data_quality.table_cells(s),
                            fmt(s["spread_within"], ".4f"), fmt(s["spread_between"], ".4f")) for s in sizes))
    pooled_table = Table("Pooled over sizes: Spearman ρ with the mean test accuracy, raw and partial (controlling "
                         "for n; bootstrap 95% CI resampling subsets within sizes)",
                         ("initial CV", "subsets", "ρ pooled, raw", "partial ρ, controlling for n"),
                         tuple((p["cv"], str(p["subsets"]), str(p["raw_rho"]), str(p["partial_rho"]))
                               for p in pooled.values()))
    return Findings("data_quality_authors", "Collective variables at initialisation vs the mean test accuracy of "
                    "several trainings (the authors' protocol)", claims, (per_size, pooled_table),
                    _notes(rows, found, sizes), {"sizes": sizes, "pooled": pooled, "subsets": found})


def figures(rows: list[dict[str, Any]], out_dir: pathlib.Path, *, sweep_dir: pathlib.Path | None = None
            ) -> list[pathlib.Path]:
    """``data_quality_authors_scatter.png``: the mean test accuracy against the initial entropy (top) and trace
    (bottom), one colour per size with ρ (left), and pooled as the standardised ranks within each size
    (:func:`rank_scores`), whose correlation is the partial ρ (right)."""
    found = subsets(rows)
    fig, axes = subplots(2, 2, panel=(5, 4))
    for n, members in _by_size(found):
        entropy, trace, accuracy = (np.array([s[key] for s in members]) for key in ("entropy", "trace", "accuracy"))
        data_quality.scatter_size(axes[:, 0], n, entropy, trace, accuracy, ylabel="mean final test accuracy")
    pooled = _pooled(found)
    for ax, name in zip(axes[:, 1], ("entropy", "trace"), strict=True):
        x, accuracy, groups = _finite_triples(*_pooled_arrays(found, name))
        if x.size:
            z_x, z_y = rank_scores(x, groups), rank_scores(accuracy, groups)
            for i, g in enumerate(np.unique(groups)):
                ax.scatter(z_x[groups == g], z_y[groups == g], s=14, alpha=0.75, color=f"C{i}", label=f"n={g}")
            ax.legend(fontsize=7)
        ax.set(xlabel=f"within-size rank score of {pooled[name]['cv']}",
               ylabel="within-size rank score of the mean accuracy",
               title=f"pooled, controlling for n\npartial ρ = {pooled[name]['partial_rho']}")
    return [save(fig, pathlib.Path(out_dir) / "data_quality_authors_scatter.png")]


# name -> (label, the subset's key, divided by n): the pooled analysis' CVs; within one size each ranks as the others
# of its kind, pooled they differ
_CVS = {"entropy": ("S₀/ln n", "entropy", False), "entropy_raw": ("S₀ (authors': not / ln n)", "entropy_raw", False),
        "trace": ("tr Θ₀", "trace", False), "trace_per_point": ("tr Θ₀/n (mean diagonal)", "trace", True)}


def _by_size(found: list[dict[str, Any]]) -> list[tuple[int | str, list[dict[str, Any]]]]:
    return data_quality.by_size(found, size=lambda s: s["n"])


def _pooled_arrays(found: list[dict[str, Any]], name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The CV ``name`` of every subset, the subsets' mean accuracies and their sizes."""
    _, key, per_point = _CVS[name]
    n = np.array([s["n"] for s in found])
    x = np.array([s[key] for s in found], np.float64)
    return (x / n if per_point else x), np.array([s["accuracy"] for s in found], np.float64), n


def _pooled(found: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    pooled = {}
    for name, (label, _, _) in _CVS.items():
        x, accuracy, n = _pooled_arrays(found, name)
        partial = partial_spearman_ci(x, accuracy, n)
        pooled[name] = {"cv": label, "subsets": partial.n, "raw_rho": spearman_ci(x, accuracy),
                        "partial_rho": partial}
    return pooled


def _pooled_claim(paper: str, pooled: dict[str, Any], sizes: list[dict[str, Any]]) -> Claim:
    label = f"{pooled['cv']}, n = {', '.join(str(s['n']) for s in sizes)}"
    return sign_claim(paper, [(label, pooled["partial_rho"])], expected=1, quantity="partial ρ",
                      groups="pooled estimates")


def _notes(rows: list[dict[str, Any]], found: list[dict[str, Any]], sizes: list[dict[str, Any]]) -> tuple[str, ...]:
    notes = []
    ratios = [(s, s["spread_within"] / s["spread_between"]) for s in sizes
              if math.isfinite(s["spread_within"]) and s["spread_between"] > 0]
    if ratios:
        notes.append("The accuracy's spread over one subset's trainings against its spread over subsets (SD over "
                     "trainings / SD over subsets; over √k for the mean of k trainings): " + ", ".join(
                         f"n={s['n']}: {ratio:.2f} ({ratio / math.sqrt(s['trainings']):.2f} for the mean of "
                         f"{s['trainings']})" for s, ratio in ratios) + ". Averaging helps the ranking where the "
                     "first is not small.")
    unfinished = sum(s["runs"] - len(s["accuracies"]) for s in found)
    if unfinished:
        notes.append(f"{unfinished} trainings diverged or failed; their subsets' means are over the others.")
    missing = sum(1 for s in found if math.isnan(s["entropy"]))
    if missing:
        notes.append(f"{missing} subsets have no CVs (no finished train.seed {CV_SEED} run) and are left out.")
    name, test_size = _rows.setting(rows[0], "data.name"), _rows.setting(rows[0], "data.test_size")
    if name in DATASET_INFO:
        tests = test_size or DATASET_INFO[name].test_examples
        notes.append(f"The test set has {tests} images, so an accuracy moves in steps of 1/{tests} = "
                     f"{1 / tests:.4f}; the authors tested on MNIST images (1000 in their 2022 notebook).")
    return tuple(notes)


def _finite_triples(x: Any, y: Any, groups: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x, y, groups = np.asarray(x, np.float64), np.asarray(y, np.float64), np.asarray(groups)
    if not x.shape == y.shape == groups.shape or x.ndim != 1:
        raise ValueError(f"x, y and groups must be 1-D of the same length, got shapes {x.shape}, {y.shape} and "
                         f"{groups.shape}")
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep], groups[keep]


def _partial(x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """:func:`partial_spearman` along the last axis (NaN without variation within any group)."""
    z_x, z_y = rank_scores(x, groups), rank_scores(y, groups)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (z_x * z_y).sum(-1) / np.sqrt((z_x**2).sum(-1) * (z_y**2).sum(-1))
