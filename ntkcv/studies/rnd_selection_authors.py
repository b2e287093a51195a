r"""Study 3 on the authors' protocol: RND-selected vs random training sets as the ZnRND draft of 2022 measured them.

The draft behind Tovey et al. (arXiv 2305.00995; ZnRND's ``examples/neurips``, May 2022) lets random network
distillation pick training sets of n = 10 … 90 images from a pool of 500 MNIST images, draws random sets of the same
sizes from the pool, and reports per n (mean ± SE over three seeds) the effective entropy of the RND *target*
network's cosine-normalised NTK on the set,

.. math::
   \hat Θ_{ij} = \frac{Θ_{ij}}{\sqrt{Θ_{ii} Θ_{jj}}}, \qquad
   \frac{S}{\ln n} = -\frac{1}{\ln n} \sum_k p_k \ln p_k, \qquad p_k = λ_k(\hat Θ) / n,

and the best test accuracy over 50 epochs of a CNN trained on the set (:data:`AUTHORS`). The experiment
(``experiments/rnd_selection_authors.py``) records per set that entropy and the set's class balance
(:func:`class_balance`) in ``selections.json``; :func:`annotate` adds them to the rows, with each run's test-accuracy
curve (one value per epoch) and its maximum, ``train.test_accuracy.max``, read from the run's store. Per n the study
gives, for RND and random sets, the mean with its SE and bootstrap 95% interval of each quantity of
:data:`QUANTITIES`, and the paired differences RND − random over seeds (the same seed draws the pool, both sets and
the classifier's initialisation) with bootstrap intervals. A claim holds at an n when the interval of the difference
lies on the claimed side of 0. The draft took the best accuracy as the maximum over epochs of the seed-mean curve;
the comparison with it does the same, the paired differences use each run's own best.

``values`` of the findings: ``sizes``, a list of dicts with ``n``, ``pairs`` and, for each quantity ``q`` of
:data:`QUANTITIES`, ``q_rnd`` and ``q_random`` (:class:`~ntkcv.studies._stats.Estimate` of the mean), ``q_rnd_se`` and
``q_random_se`` (standard errors) and ``q_difference`` (Estimate of the mean paired difference); ``curve_best_rnd``,
``curve_best_random`` and their ``_se`` (the draft's reduction of the accuracy curves); and ``entropy_trend``, the
Estimate of Spearman's ρ between n and the paired entropy difference.
"""

from __future__ import annotations

import math
import pathlib
from typing import Any

import numpy as np

from ntkcv.studies import _rows
from ntkcv.studies._findings import Claim, Findings, Table, sign_claim
from ntkcv.studies._plots import save, subplots
from ntkcv.studies._stats import Estimate, mean_ci, spearman_ci
from ntkcv.studies.rnd_selection import METHODS, paired, paired_sizes, read_selections

QUANTITIES = {"target_entropy": "target_entropy", "best_accuracy": "train.test_accuracy.max",
              "final_accuracy": "train.test_accuracy.final", "classes": "classes", "class_entropy": "class_entropy",
              "classifier_entropy": "effective_entropy.initial", "classifier_trace": "trace.initial"}
"""Quantity → its column: the target network's S/ln n on the set, the best and the final test accuracy, the classes
present and the normalised class entropy of the set, the classifier's initial S/ln n and trace on it."""
RECORDED = ("target_entropy", "classes", "class_entropy", "rounds_at_cap")
"""The fields of a ``selections.json`` record that :func:`annotate` copies onto its runs' rows."""
CURVE = "test_accuracy_curve"
"""The column :func:`annotate` adds: the run's test accuracy at each evaluation, in step order."""

AUTHORS: dict[int, dict[str, tuple[float, float]]] = {
    10: {"target_entropy_rnd": (0.628, 0.006), "target_entropy_random": (0.561, 0.014),
         "best_accuracy_rnd": (0.450, 0.009), "best_accuracy_random": (0.340, 0.026)},
    30: {"target_entropy_rnd": (0.508, 0.010), "target_entropy_random": (0.489, 0.010),
         "best_accuracy_rnd": (0.617, 0.040), "best_accuracy_random": (0.399, 0.122)},
    50: {"target_entropy_rnd": (0.486, 0.019), "target_entropy_random": (0.473, 0.009),
         "best_accuracy_rnd": (0.732, 0.028), "best_accuracy_random": (0.701, 0.026)},
    70: {"target_entropy_rnd": (0.433, 0.001), "target_entropy_random": (0.416, 0.002),
         "best_accuracy_rnd": (0.555, 0.181), "best_accuracy_random": (0.781, 0.015)},
    90: {"target_entropy_rnd": (0.430, 0.004), "target_entropy_random": (0.419, 0.002),
         "best_accuracy_rnd": (0.809, 0.026), "best_accuracy_random": (0.827, 0.015)},
}
"""The draft's numbers, (mean, SE) over 3 seeds (SE: population standard deviation / √3), from ZnRND commit 758fbc0,
``examples/neurips/<n>_analysis/{entropy,accuracy}_<n>.npy``; the best accuracy is the maximum over the 50 epochs of the
seed-mean test-accuracy curve (500 MNIST test images)."""

PROTOCOL = (
    "Protocol differences from the draft: 8×8 digits (pool of 500 of a seed's 1437 training images; all 360 test "
    "images) instead of 28×28 MNIST (pool: the first 500 training images; 500 test images); RND target and predictor "
    "ReLU MLPs (128, 128) → 256 instead of CNNs (Conv 32, Conv 64, Dense 256); the predictor retrained after each "
    "pick with ≥ 100 full-batch Adam steps (10⁻²) and then until its loss per output is < 10⁻³ (at most 1000 steps) "
    "instead of ≥ 100 epochs of batch-1 steps and then to that loss; the picks are distinct (the draft's could repeat) "
    "and random sets are drawn without replacement (the draft's with); the sizes are prefixes of one greedy order per "
    "seed (the draft ran each size afresh: the same distribution per size); SE from the sample standard deviation.",
)


def class_balance(labels: np.ndarray, num_classes: int) -> dict[str, float]:
    r"""``classes``: how many classes the labels hold; ``class_entropy``: the entropy of their frequencies
    :math:`q_c` over its maximum, :math:`-\sum_c q_c \ln q_c / \ln C` (1: balanced over all ``C`` classes)."""
    counts = np.bincount(np.asarray(labels), minlength=num_classes)
    q = counts[counts > 0] / counts.sum()
    return {"classes": int(q.size), "class_entropy": float(-np.sum(q * np.log(q)) / math.log(num_classes))}


def annotate(rows: list[dict[str, Any]], sweep_dir: pathlib.Path) -> list[dict[str, Any]]:
    """``rows`` with ``selection`` and the :data:`RECORDED` fields of their record in ``selections.json``, and
    :data:`CURVE` and ``train.test_accuracy.max`` from each run's store (where it has the series)."""
    from ntkcv.report import read_scalars

    records = read_selections(sweep_dir)
    annotated = []
    for row in rows:
        record = records.get(_rows.setting(row, "data.indices") or (), {})
        extra = {"selection": record.get("method"), **{key: record[key] for key in RECORDED if key in record}}
        store = pathlib.Path(sweep_dir) / "runs" / str(row["run_id"]) / "ntkcv.h5"
        series = read_scalars(store) if store.is_file() else {}
        if "train/test_accuracy" in series:
            steps, values = series["train/test_accuracy"]
            curve = values[np.argsort(steps, kind="stable")].astype(np.float64)
            extra |= {CURVE: curve, "train.test_accuracy.max": float(np.max(curve))}
        annotated.append({**row, **extra})
    return annotated


def analyse(rows: list[dict[str, Any]]) -> Findings:
    """Per size: each quantity's mean, SE and interval for both methods, the paired differences, the draft's numbers
    beside ours, and verdicts on the draft's claims."""
    sizes = []
    for n, pairs, values in paired_sizes(rows, QUANTITIES):
        entry: dict[str, Any] = {"n": n, "pairs": len(pairs)}
        for name, by_method in values.items():
            for method in METHODS:
                entry |= {f"{name}_{method}": mean_ci(by_method[method]), f"{name}_{method}_se": _se(by_method[method])}
            entry[f"{name}_difference"] = mean_ci(by_method["rnd"] - by_method["random"])
        for method in METHODS:
            entry[f"curve_best_{method}"], entry[f"curve_best_{method}_se"] = _best_of_mean(
                [pair[method][CURVE] for pair in pairs if CURVE in pair[method]])
        sizes.append(entry)
    entropy_trend = _entropy_trend(rows)
    claims = (
        _claim("RND selects sets on which the RND target network's cosine-normalised NTK has a larger effective "
               "entropy than on random sets from the same pool (draft: 0.628 vs 0.561 at n = 10, 0.508 vs 0.489 at "
               "30, 0.430 vs 0.419 at 90).", sizes, "target_entropy", "ΔS/ln n"),
        _claim("A classifier trained on an RND set reaches a higher best test accuracy over 50 epochs than on a random "
               "set (draft: 0.45 vs 0.34 at n = 10, 0.617 vs 0.399 at 30; but 0.555 vs 0.781 at 70, 0.809 vs 0.827 "
               "at 90).", sizes, "best_accuracy", "Δ best accuracy"),
        _claim("A classifier trained on an RND set ends its 50 epochs with a higher test accuracy than on a random set "
               "(draft: 0.373 vs 0.257 at n = 10, 0.587 vs 0.383 at 30; 0.555 vs 0.781 at 70, 0.804 vs 0.827 at 90).",
               sizes, "final_accuracy", "Δ final accuracy"),
        sign_claim("The entropy gain of RND shrinks as the sets grow (draft: 0.067 at n = 10, 0.019 at 30, 0.011 at "
                   "90).", [("all sizes", entropy_trend)], expected=-1, quantity="Spearman ρ(n, ΔS/ln n)",
                   groups="tests"),
    )
    notes = [*PROTOCOL]
    unpaired = sum(1 for row in rows if row.get("selection") in METHODS) - 2 * sum(s["pairs"] for s in sizes)
    if unpaired:
        notes.append(f"{unpaired} runs have no finished partner (diverged or failed) and are left out.")
    capped = _rounds_at_cap(rows)
    if capped is not None:
        notes.append(f"The RND predictor stopped at its step cap above the loss threshold in {capped[0]} of "
                     f"{capped[1]} rounds.")
    return Findings("rnd_selection_authors", "RND vs random data selection on the authors' protocol", claims,
                    _tables(sizes), tuple(notes), {"sizes": sizes, "entropy_trend": entropy_trend})


def figures(rows: list[dict[str, Any]], out_dir: pathlib.Path, *, sweep_dir: pathlib.Path | None = None
            ) -> list[pathlib.Path]:
    """``rnd_selection_authors.png``: the target network's S/ln n, the best test accuracy (the maximum of the
    seed-mean curve; dots: each run's best) and the class entropy against n, for both methods (mean ± SE), with the
    draft's points."""
    sizes = analyse(rows).values["sizes"]
    fig, axes = subplots(1, 3, panel=(4.2, 3.6))
    panels = (("target_entropy", "target_entropy", "S/ln n of the RND target's cosine NTK"),
              ("curve_best", "best_accuracy", "best test accuracy over the epochs"),
              ("class_entropy", "class_entropy", "class entropy / ln 10"))
    for ax, (name, quantity, title) in zip(axes[0], panels, strict=True):
        for offset, method in zip((-0.6, 0.6), METHODS, strict=True):
            colour = f"C{METHODS.index(method)}"
            n = np.array([s["n"] for s in sizes], np.float64) + offset
            mean = [s[f"{name}_{method}"].value if name != "curve_best" else s[f"curve_best_{method}"] for s in sizes]
            ax.errorbar(n, mean, yerr=[s[f"{name}_{method}_se"] for s in sizes], color=colour, marker="o",
                        capsize=3, label=f"{method} (ours)")
            for s in sizes:
                values = [_rows.number(r, QUANTITIES[quantity]) for r in rows if r.get("selection") == method
                          and _rows.train_size(r) == s["n"] and _rows.status(r) == "complete"]
                ax.scatter(np.full(len(values), s["n"] + offset), values, s=8, alpha=0.35, color=colour)
            drafted = [(size, numbers[f"{quantity}_{method}"]) for size, numbers in AUTHORS.items()
                       if f"{quantity}_{method}" in numbers]
            if drafted:
                ax.errorbar([size + 2 * offset for size, _ in drafted], [m for _, (m, _) in drafted],
                            yerr=[se for _, (_, se) in drafted], color=colour, marker="s", mfc="none",
                            linestyle=":", capsize=3, label=f"{method} (draft, MNIST)")
        ax.set(xlabel="training points n", title=title)
        ax.legend(fontsize=7)
    return [save(fig, pathlib.Path(out_dir) / "rnd_selection_authors.png")]


def _tables(sizes: list[dict[str, Any]]) -> tuple[Table, ...]:
    def ours(s: dict[str, Any], name: str, method: str) -> str:
        value = s[f"curve_best_{method}"] if name == "curve_best" else s[f"{name}_{method}"].value
        return _pm(value, s[f"{name}_{method}_se"])

    def draft(n: int, name: str) -> str:
        return _pm(*AUTHORS[n][name]) if n in AUTHORS else "–"

    comparison = Table(
        "Ours beside the draft (mean ± SE over seeds; best accuracy: the maximum of the seed-mean curve, as the draft "
        "took it)",
        ("n", "seeds", "S/ln n RND", "draft", "S/ln n random", "draft", "best acc. RND", "draft", "best acc. random",
         "draft"),
        tuple((str(s["n"]), str(s["pairs"]), ours(s, "target_entropy", "rnd"), draft(s["n"], "target_entropy_rnd"),
               ours(s, "target_entropy", "random"), draft(s["n"], "target_entropy_random"),
               ours(s, "curve_best", "rnd"), draft(s["n"], "best_accuracy_rnd"), ours(s, "curve_best", "random"),
               draft(s["n"], "best_accuracy_random")) for s in sizes))
    differences = Table(
        "Paired differences RND − random over seeds (mean [95% CI]); best accuracy: each run's maximum over the epochs",
        ("n", "pairs", "Δ S/ln n (target)", "Δ best acc.", "Δ final acc.", "Δ classes", "Δ class entropy",
         "Δ S₀/ln n (classifier)", "Δ tr Θ₀ (classifier)"),
        tuple((str(s["n"]), str(s["pairs"]), *(str(s[f"{name}_difference"]) for name in QUANTITIES)) for s in sizes))
    balance = Table(
        "Per method (mean [95% CI] over seeds)",
        ("n", "S/ln n RND", "random", "best acc. RND", "random", "final acc. RND", "random", "classes RND", "random",
         "class entropy RND", "random"),
        tuple((str(s["n"]), *(s[f"{name}_{method}"].format(spec) for name, spec in
                              (("target_entropy", ".3f"), ("best_accuracy", ".3f"), ("final_accuracy", ".3f"),
                               ("classes", ".1f"), ("class_entropy", ".3f")) for method in METHODS))
              for s in sizes))
    return comparison, differences, balance


def _claim(paper: str, sizes: list[dict[str, Any]], name: str, quantity: str) -> Claim:
    estimates = [(f"n={s['n']}", s[f"{name}_difference"]) for s in sizes if s["pairs"] >= 2]
    return sign_claim(paper, estimates, expected=1, quantity=quantity)


def _entropy_trend(rows: list[dict[str, Any]]) -> Estimate:
    """Spearman's ρ between n and the paired target-entropy difference, over every (n, seed) pair."""
    sizes, differences = [], []
    for n, members in _rows.group(rows, _rows.train_size).items():
        for pair in paired(members):
            sizes.append(float(n))
            differences.append(_rows.number(pair["rnd"], "target_entropy") - _rows.number(pair["random"],
                                                                                          "target_entropy"))
    return spearman_ci(np.array(sizes), np.array(differences))


def _rounds_at_cap(rows: list[dict[str, Any]]) -> tuple[int, int] | None:
    """Rounds at the step cap and rounds in all, over the seeds' RND orders (their longest prefixes)."""
    longest: dict[Any, dict[str, Any]] = {}
    for row in rows:
        if row.get("selection") == "rnd" and "rounds_at_cap" in row:
            seed = _rows.setting(row, "train.seed")
            if seed not in longest or _rows.train_size(row) > _rows.train_size(longest[seed]):
                longest[seed] = row
    if not longest:
        return None
    return sum(int(r["rounds_at_cap"]) for r in longest.values()), sum(_rows.train_size(r) for r in longest.values())


def _best_of_mean(curves: list[np.ndarray]) -> tuple[float, float]:
    """The largest value of the mean of ``curves`` and the SE of the mean there (NaN without equal-length curves)."""
    if not curves or len({len(c) for c in curves}) != 1:
        return math.nan, math.nan
    stacked = np.stack(curves)
    best = int(np.argmax(stacked.mean(axis=0)))
    return float(stacked[:, best].mean()), _se(stacked[:, best])


def _se(values: np.ndarray) -> float:
    """The standard error of the mean of the finite ``values`` (sample standard deviation / √k); NaN for k < 2."""
    x = np.asarray(values, np.float64)
    x = x[np.isfinite(x)]
    return float(x.std(ddof=1) / math.sqrt(x.size)) if x.size >= 2 else math.nan


def _pm(value: float, se: float) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{value:.3f}" if math.isnan(se) else f"{value:.3f} ± {se:.3f}"
