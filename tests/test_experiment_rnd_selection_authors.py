"""The RND selection study on the authors' protocol: the quick sweep end to end, its recorded numbers against
independent references, and the analysis on rows with known answers."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from experiments import _common
from experiments import rnd_selection_authors as experiment
from ntkcv.config import ConfigError
from ntkcv.data import load_dataset
from ntkcv.selection import random_select, rnd_networks
from ntkcv.studies import rnd_selection_authors as study
from ntkcv.sweep import expand, load_sweep, read_table

pytestmark = pytest.mark.standard_dtype_promotion  # the RND predictor trains with optax's Adam


def _dense_effective_cosine_entropy(apply_fn, params, x, chunk=64):
    """S/ln n of Θ̂ = Θ_ij / √(Θ_ii Θ_jj), Θ = Σ_k J_k J_kᵀ from float64 dense Jacobians (``chunk`` outputs at a
    time), eigenvalues by numpy."""
    kernel = np.zeros((len(x), len(x)))
    with jax.enable_x64(True):
        params = jax.tree.map(lambda leaf: jnp.asarray(leaf, jnp.float64), params)
        x = jnp.asarray(x, jnp.float64)

        def block(p, start):  # outputs start … start + chunk − 1
            return jax.lax.dynamic_slice_in_dim(apply_fn(p, x), start, chunk, axis=1)

        jacobian_fn = jax.jit(jax.jacrev(block))
        for start in range(0, apply_fn(params, x).shape[1], chunk):
            jacobian = jacobian_fn(params, start)
            flat = np.concatenate([np.asarray(leaf).reshape(*leaf.shape[:2], -1)
                                   for leaf in jax.tree.leaves(jacobian)], axis=-1)  # (n, chunk, parameters)
            kernel += np.einsum("ikp,jkp->ij", flat, flat)
    cosine = kernel / np.sqrt(np.outer(np.diag(kernel), np.diag(kernel)))
    p = np.clip(np.linalg.eigvalsh(cosine), 0, None) / len(x)
    p = p[p > 0]
    return float(-np.sum(p * np.log(p)) / math.log(len(x)))


def test_quick_end_to_end(tmp_path):
    assert experiment.main(["--quick", "--dir", str(tmp_path), "--workers", "2"]) == 0
    selections = json.loads((tmp_path / "selections.json").read_text())
    assert sorted((s["method"], s["seed"], s["size"]) for s in selections) == sorted(
        (method, seed, size) for method in ("rnd", "random") for seed in (0, 1) for size in (10, 20))
    record = {(s["method"], s["seed"], s["size"]): s for s in selections}
    for seed in (0, 1):
        data = load_dataset("digits", seed=seed)
        pool = random_select(len(data.x_train), experiment.QUICK_PROTOCOL.pool,
                             key=jax.random.split(jax.random.key(seed), 3)[0])
        for method in ("rnd", "random"):
            short, long = record[method, seed, 10]["indices"], record[method, seed, 20]["indices"]
            assert long[:10] == short and len(set(long)) == 20 and set(long) <= set(pool.tolist())  # nested prefixes
            counts = np.bincount(data.y_train[long], minlength=10)
            assert record[method, seed, 20]["classes"] == np.count_nonzero(counts)
            assert record[method, seed, 20]["class_entropy"] == pytest.approx(stats.entropy(counts) / math.log(10))
        assert record["rnd", seed, 20]["rounds_at_cap"] == 0
    # the recorded entropy of the RND target's cosine NTK, recomputed densely in float64
    data = load_dataset("digits", seed=1)
    target = rnd_networks(data.x_train, key=jax.random.split(jax.random.key(1), 3)[1], **experiment.RND_NETWORKS).target
    rows = record["rnd", 1, 10]["indices"]
    assert record["rnd", 1, 10]["target_entropy"] == pytest.approx(
        _dense_effective_cosine_entropy(target.apply_fn, target.params, data.x_train[rows]), rel=1e-4)

    rows = study.annotate(read_table(tmp_path / "results.csv"), tmp_path)
    assert sorted(row["selection"] for row in rows) == ["random"] * 4 + ["rnd"] * 4
    for row in rows:  # 5 epochs of n / 10 batches, the test accuracy after each
        n = len(json.loads(row["config.data.indices"]))
        assert row["config.train.steps"] == 5 * (n // 10) and len(row[study.CURVE]) == 5
        assert row["train.test_accuracy.max"] == max(row[study.CURVE]) >= row["train.test_accuracy.final"]
        assert row["train.test_accuracy.final"] == pytest.approx(row[study.CURVE][-1])
    findings = study.analyse(rows)
    assert [(s["n"], s["pairs"]) for s in findings.values["sizes"]] == [(10, 2), (20, 2)]
    text = (tmp_path / "findings.md").read_text()
    assert "## RND vs random data selection on the authors' protocol" in text
    assert "| 10 | 2 |" in text and "0.628 ± 0.006" in text and "Δ S/ln n (target)" in text
    assert (tmp_path / "figures" / "rnd_selection_authors.png").stat().st_size > 5000


def test_class_balance_closed_forms():
    two = pytest.approx(math.log(2) / math.log(10))
    assert study.class_balance(np.array([0, 0, 1, 1]), 10) == {"classes": 2, "class_entropy": two}
    assert study.class_balance(np.arange(20) % 10, 10) == {"classes": 10, "class_entropy": pytest.approx(1.0)}
    assert study.class_balance(np.full(7, 3), 10) == {"classes": 1, "class_entropy": 0.0}


def _row(method: str, seed: int, n: int, *, entropy: float, curve: list[float]) -> dict:
    indices = [seed * 1000 + (500 if method == "rnd" else 0) + i for i in range(n)]
    return {"run_id": f"{method}-{seed}-{n}", "status": "complete", "selection": method,
            "config.train.seed": seed, "config.data.indices": json.dumps(indices), "target_entropy": entropy,
            study.CURVE: np.array(curve), "train.test_accuracy.max": max(curve),
            "train.test_accuracy.final": curve[-1], "classes": 10 if method == "rnd" else 8,
            "class_entropy": 0.9 if method == "rnd" else 0.8, "effective_entropy.initial": 0.5, "trace.initial": 1.0,
            "rounds_at_cap": 1 if method == "rnd" and seed == 0 else 0}


def test_analyse_pairs_seeds_and_takes_the_drafts_reduction():
    rows, sizes, gaps = [], [], []
    for seed in range(4):
        for n, gap in ((10, 0.06), (30, 0.03), (50, 0.01)):
            rows.append(_row("rnd", seed, n, entropy=0.5 + gap + 0.01 * seed + (0.004 * seed if n > 10 else 0),
                             curve=[0.5, 0.7, 0.6] if seed % 2 else [0.5, 0.6, 0.8]))
            rows.append(_row("random", seed, n, entropy=0.5 + 0.01 * seed, curve=[0.4, 0.5, 0.5]))
            sizes.append(n)
            gaps.append(gap + (0.004 * seed if n > 10 else 0))
    findings = study.analyse(rows)
    ten, _, _ = findings.values["sizes"]
    assert (ten["n"], ten["pairs"]) == (10, 4)
    assert ten["target_entropy_difference"].value == pytest.approx(0.06)
    assert ten["target_entropy_difference"].low == pytest.approx(0.06)  # identical differences: a point interval
    assert ten["target_entropy_rnd_se"] == pytest.approx(np.std([0.56, 0.57, 0.58, 0.59], ddof=1) / 2)
    assert ten["best_accuracy_rnd"].value == pytest.approx(0.75)  # each run's best: 0.7 and 0.8
    assert ten["curve_best_rnd"] == pytest.approx(0.7)  # the mean curve [0.5, 0.65, 0.7]: its maximum, at the end
    assert ten["curve_best_rnd_se"] == pytest.approx(np.std([0.6, 0.8, 0.6, 0.8], ddof=1) / 2)
    assert ten["classes_difference"].value == 2 and ten["final_accuracy_difference"].value == pytest.approx(0.2)
    assert findings.values["entropy_trend"].value == pytest.approx(stats.spearmanr(sizes, gaps).statistic)
    entropy, best, final, trend = findings.claims
    assert (entropy.verdict, best.verdict, final.verdict) == ("reproduced",) * 3
    assert "n=10: ΔS/ln n = +0.060" in entropy.evidence
    assert trend.verdict == "reproduced" and "significantly negative in 1 of 1 tests" in trend.evidence
    assert any("step cap above the loss threshold in 1 of 200 rounds" in note for note in findings.notes)
    comparison = findings.tables[0].markdown()
    assert ("| 10 | 4 | 0.575 ± 0.006 | 0.628 ± 0.006 | 0.515 ± 0.006 | 0.561 ± 0.014 | 0.700 ± 0.058 | 0.450 ± 0.009 |"
            in comparison)
    assert "| 30 | 4 |" in comparison and "0.617 ± 0.040" in comparison
    with pytest.raises(ValueError, match="call annotate"):
        study.analyse([{**row, "selection": None} for row in rows])


def test_selection_sweep_runs_fifty_epochs_with_an_evaluation_after_each():
    sweep = load_sweep(_common.CONFIGS / "rnd_selection_authors.yaml")
    assert len(expand(sweep)) == 100  # grid points: 5 sizes × 20 seeds, an RND and a random run each
    selections = [{"method": "rnd", "seed": 3, "size": 90, "indices": list(range(90))},
                  {"method": "random", "seed": 3, "size": 10, "indices": list(range(100, 110))}]
    runs = expand(experiment.selection_sweep(sweep, selections, 50))
    assert [(r.config.train.seed, len(r.config.data.indices), r.config.train.steps, r.config.train.eval_every)
            for r in runs] == [(3, 90, 450, 9), (3, 10, 50, 1)]
    assert {(r.config.model.kind, r.config.model.channels, r.config.model.widths, r.config.train.batch_size)
            for r in runs} == {("cnn", (32, 64), (256,), 10)}
    with pytest.raises(ConfigError, match=r"grid must have exactly the keys data\.train_size, train\.seed and no runs; "
                       r"got grid keys train\.seed and 0 runs"):
        experiment.select(dataclasses.replace(sweep, grid={"train.seed": (0, 1)}))
