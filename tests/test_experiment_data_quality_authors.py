"""The data-quality study on the authors' protocol: its partial correlation, its analysis, its sweep and --quick."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from experiments import _common, data_quality_authors
from ntkcv.config import ConfigError, load_config
from ntkcv.data import load_dataset
from ntkcv.report import read_scalars
from ntkcv.studies import data_quality_authors as study
from ntkcv.sweep import expand, load_sweep, read_table
from ntkcv.train import train
from ntkcv.zoo import make_model
from tests.studies.rows import row

# --- the partial Spearman correlation ------------------------------------------------------------------------------


def test_partial_spearman_removes_a_correlation_that_comes_from_the_size_alone():
    within_x, within_y = np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.0, 4.0, 1.0, 3.0])  # Spearman ρ = 0 exactly
    assert stats.spearmanr(within_x, within_y).statistic == pytest.approx(0.0, abs=1e-12)
    groups = np.repeat([10, 30, 50, 70, 90], 4)
    x = np.tile(within_x, 5) + groups  # both rise with the size
    y = np.tile(within_y, 5) + groups / 10
    assert stats.spearmanr(x, y).statistic > 0.9
    assert study.partial_spearman(x, y, groups) == pytest.approx(0.0, abs=1e-12)
    estimate = study.partial_spearman_ci(x, y, groups)
    assert estimate.n == 20 and estimate.low < 0 < estimate.high


def test_partial_spearman_is_the_size_weighted_mean_of_the_sizes_spearman_rho():
    rng = np.random.default_rng(3)
    groups = np.repeat([10, 30, 50, 90], [5, 8, 6, 9])
    x = rng.normal(size=groups.size) + groups / 30
    y = 0.5 * x + rng.normal(size=groups.size) + groups / 40
    rhos = [stats.spearmanr(x[groups == g], y[groups == g]).statistic for g in np.unique(groups)]
    expected = np.dot(rhos, [5, 8, 6, 9]) / groups.size
    assert study.partial_spearman(x, y, groups) == pytest.approx(expected, rel=1e-12)
    assert study.partial_spearman(x / np.log(groups), y, groups) == pytest.approx(expected, rel=1e-12)  # S vs S/ln n
    assert study.partial_spearman(np.append(x, np.nan), np.append(y, 1.0), np.append(groups, 10)) == pytest.approx(
        expected, rel=1e-12)  # a non-finite value drops its triple


def test_partial_spearman_with_ties_is_the_correlation_of_rank_residuals_on_the_size_indicators():
    rng = np.random.default_rng(4)
    groups = np.repeat([10, 30, 50], [7, 4, 9])
    x, y = np.round(rng.normal(size=(2, groups.size)), 0) + groups / 10  # many ties
    design = (groups[:, None] == np.unique(groups)[None, :]).astype(float)  # one indicator column per size
    residuals = []
    for values in (x, y):
        ranks = np.empty(groups.size)
        for g in np.unique(groups):
            ranks[groups == g] = stats.rankdata(values[groups == g])
        residual = ranks - design @ np.linalg.lstsq(design, ranks, rcond=None)[0]
        spread = np.sqrt(design @ np.linalg.lstsq(design, residual**2, rcond=None)[0])  # each size's SD
        residuals.append(residual / spread)
    expected = np.sum(residuals[0] * residuals[1]) / np.sqrt(np.sum(residuals[0] ** 2) * np.sum(residuals[1] ** 2))
    assert study.partial_spearman(x, y, groups) == pytest.approx(expected, rel=1e-12)


def test_partial_spearman_ci_resamples_within_sizes():
    rng = np.random.default_rng(0)
    groups = np.repeat([10, 50], 15)
    x = rng.normal(size=30) + groups
    related = study.partial_spearman_ci(x, x + 0.3 * rng.normal(size=30), groups)
    assert related.value > 0.8 and related.low > 0.5 and related.high <= 1
    unrelated = study.partial_spearman_ci(x, rng.normal(size=30) + groups, groups)
    assert unrelated.low < unrelated.value < unrelated.high and unrelated.excludes_zero is False
    assert math.isnan(study.partial_spearman_ci([1.0, 2.0], [1.0, 2.0], [1, 1]).value)  # fewer than three
    with pytest.raises(ValueError, match="x, y and groups must be 1-D of the same length"):
        study.partial_spearman([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [1, 1])


# --- the analysis on synthetic rows --------------------------------------------------------------------------------


def _row(n, subset, seed, accuracy, **cvs):
    cells = row(train_size=n, seed=seed, train__test_accuracy__final=accuracy, **cvs)
    return {**cells, "run_id": f"{n}-{subset}-{seed}", "config.data.subset_seed": subset, "config.data.name": "digits",
            "config.data.test_size": None}


def test_analysis_takes_the_cvs_of_one_initialisation_and_averages_the_trainings():
    rows = []
    for n in (10, 30):
        for subset in range(8):
            entropy = 0.2 + 0.01 * subset  # the mean accuracy rises with the entropy and falls with the trace
            rows.append(_row(n, subset, 0, 0.5 + 0.02 * subset, effective_entropy__initial=entropy,
                             entropy__initial=entropy * math.log(n), trace__initial=100.0 - subset))
            rows += [_row(n, subset, seed, 0.5 + 0.02 * subset + 0.01 * (-1) ** seed) for seed in (1, 2)]
    rows[1] = {**rows[1], "effective_entropy.initial": 9.0}  # another initialisation's CVs are not read
    rows[2] = {**rows[2], "status": "diverged", "train.test_accuracy.final": math.nan}
    findings = study.analyse(rows)
    first = findings.values["subsets"][0]
    assert (first["n"], first["subset_seed"], first["entropy"]) == (10, 0, pytest.approx(0.2))
    assert first["accuracies"] == {0: 0.5, 1: pytest.approx(0.49)} and first["accuracy"] == pytest.approx(0.495)
    small, large = findings.values["sizes"]
    assert (small["n"], small["subsets"], small["trainings"]) == (10, 8, 3)
    for size in (small, large):
        assert size["entropy_rho"].value == pytest.approx(1.0) and size["trace_rho"].value == pytest.approx(-1.0)
    means = [0.495] + [0.5 + 0.02 * subset for subset in range(1, 8)]  # seeds 1 and 2 cancel in the mean
    assert small["spread_between"] == pytest.approx(np.std(means, ddof=1))
    assert large["spread_within"] == pytest.approx(np.std([0.0, 0.01, -0.01], ddof=1))
    pooled = findings.values["pooled"]
    assert pooled["entropy"]["partial_rho"].value == pooled["entropy_raw"]["partial_rho"].value == pytest.approx(1.0)
    assert pooled["entropy"]["raw_rho"].value != pytest.approx(pooled["entropy_raw"]["raw_rho"].value)
    entropy, trace, pooled_entropy, pooled_trace = findings.claims
    assert (entropy.verdict, trace.verdict) == ("reproduced", "not reproduced")
    assert (pooled_entropy.verdict, pooled_trace.verdict) == ("reproduced", "not reproduced")
    notes = " ".join(findings.notes)
    assert "1 trainings diverged or failed" in notes and "1/360 = 0.0028" in notes
    ratio = large["spread_within"] / large["spread_between"]
    assert f"n=30: {ratio:.2f} ({ratio / math.sqrt(3):.2f} for the mean of 3)" in notes


# --- the sweep ----------------------------------------------------------------------------------------------------


def test_full_sweep_is_the_authors_protocol_with_the_documented_size():
    sweep = load_sweep(_common.CONFIGS / "data_quality_authors.yaml")
    assert list(sweep.runs) == data_quality_authors.training_runs((10, 30, 50, 70, 90), trainings=5, epochs=500)
    runs = expand(sweep)
    assert len(runs) == 500
    for run in runs:
        config = run.config
        assert config.train.steps == 500 * config.data.train_size // 10 and config.train.batch_size == 10
        assert (config.optimizer.name, config.optimizer.learning_rate) == ("adam", 1e-3)
        assert (config.model.kind, config.model.channels, config.model.widths) == ("cnn", (32, 64), (256,))
        assert config.data.seed == 0 and config.monitor.enabled == (config.train.seed == 0)
        assert config.train.eval_every >= config.train.steps and config.monitor.every_steps >= config.train.steps


@pytest.mark.standard_dtype_promotion
def test_data_seed_fixes_the_data_while_train_seed_varies_the_network(tmp_path):
    """The initial trace of train.seed 3's network on the subset of data.seed 0's split, against the NTK built
    here in float64 from that data and that initialisation."""
    data = load_dataset("digits", train_size=12, seed=0, subset_seed=1)
    module = make_model("mlp", num_outputs=10, widths=(16,), activation="tanh")
    params = jax.jit(module.init)(jax.random.key(3), jnp.asarray(data.x_train[:1]))["params"]

    def expected_trace(x):
        jacobian = jax.jacrev(lambda p: module.apply({"params": p}, jnp.asarray(x, jnp.float64)))(
            jax.tree.map(lambda leaf: jnp.asarray(leaf, jnp.float64), params))
        return sum(float(jnp.sum(leaf**2)) for leaf in jax.tree.leaves(jacobian))

    overrides = {"data.train_size": 12, "data.subset_seed": 1, "data.probe_set": "train", "model.widths": [16],
                 "train.steps": 1, "train.batch_size": 12, "train.seed": 3, "monitor.every_steps": 1,
                 "monitor.cvs": ["trace"], "monitor.probe_sets": ["train"], "monitor.drift": False,
                 "monitor.spectrum": False, "monitor.weight_metrics": False, "output.tensorboard": False,
                 "output.progress": False}
    traces = {}
    for data_seed in (0, None):
        config = load_config(None, {**overrides, "data.seed": data_seed, "output.dir": str(tmp_path / f"{data_seed}")})
        steps, values = read_scalars(train(config)["hdf5"])["cv/trace"]
        traces[data_seed] = values[list(steps).index(0)]
    with jax.enable_x64(True):
        assert traces[0] == pytest.approx(expected_trace(data.x_train), rel=1e-4)
        other = load_dataset("digits", train_size=12, seed=3, subset_seed=1).x_train  # data.seed None: train.seed's
        assert traces[None] == pytest.approx(expected_trace(other), rel=1e-4)
    assert traces[0] != pytest.approx(traces[None], rel=1e-3)
    with pytest.raises(ConfigError, match=r"data\.seed must be at least 0 or null, got -1"):
        load_config(None, {"data.seed": -1})


def test_quick_mode_end_to_end(tmp_path):
    assert data_quality_authors.main(["--quick", "--dir", str(tmp_path), "--workers", "2"]) == 0
    rows = read_table(tmp_path / "results.csv")
    assert len(rows) == 16 and all(r["status"] == "complete" for r in rows)
    by_subset = {}
    for r in rows:
        by_subset.setdefault((r["config.data.train_size"], r["config.data.subset_seed"]), []).append(r)
    assert len(by_subset) == 8
    findings = study.analyse(rows)
    for (n, subset_seed), members in by_subset.items():
        # the same images: one split (data.seed), one draw (train_size, subset_seed); only the network varies
        assert {(r["config.data.seed"], r["config.data.indices"]) for r in members} == {(0, None)}
        assert sorted(r["config.train.seed"] for r in members) == [0, 1]
        assert sorted(r["config.train.steps"] for r in members) == [20 * n // 10] * 2
        # the CVs of one initialisation: train.seed 0's run alone logs them
        (reference,) = [r for r in members if r["config.train.seed"] == 0]
        assert all(r.get("effective_entropy.initial") is None for r in members if r is not reference)
        (found,) = [s for s in findings.values["subsets"] if (s["n"], s["subset_seed"]) == (n, subset_seed)]
        assert found["entropy"] == reference["effective_entropy.initial"]
        assert found["accuracy"] == pytest.approx(np.mean([r["train.test_accuracy.final"] for r in members]))
    # train.seed 0's CVs are those of its initialisation on the subset's own points (float64 reference)
    n, subset_seed = 10, 2
    (reference,) = [r for r in by_subset[n, subset_seed] if r["config.train.seed"] == 0]
    x = load_dataset("digits", train_size=n, seed=0, subset_seed=subset_seed).x_train
    module = make_model("cnn", num_outputs=10, channels=(32, 64), widths=(256,), activation="relu")
    params = jax.jit(module.init)(jax.random.key(0), jnp.asarray(x[:1]))["params"]
    with jax.enable_x64(True):
        jacobian = jax.jacrev(lambda p: module.apply({"params": p}, jnp.asarray(x, jnp.float64)))(
            jax.tree.map(lambda leaf: jnp.asarray(leaf, jnp.float64), params))
        flat = np.concatenate([np.asarray(leaf).reshape(n, 10, -1) for leaf in jax.tree.leaves(jacobian)], axis=-1)
    kernel = np.einsum("ikp,jkp->ij", flat, flat)  # summed over the outputs, as the monitor's default trace_axes
    eigenvalues = np.clip(np.linalg.eigvalsh(kernel), 0, None)
    p = eigenvalues / eigenvalues.sum()
    entropy = -np.sum(p[p > 0] * np.log(p[p > 0]))
    assert reference["trace.initial"] == pytest.approx(np.trace(kernel), rel=1e-4)
    assert reference["entropy.initial"] == pytest.approx(entropy, rel=1e-3)
    assert reference["effective_entropy.initial"] == pytest.approx(entropy / np.log(n), rel=1e-3)
    # per size, ρ of the table's CVs with the recomputed means
    for size in findings.values["sizes"]:
        members = [s for s in findings.values["subsets"] if s["n"] == size["n"]]
        means = [np.mean([r["train.test_accuracy.final"] for r in by_subset[size["n"], s["subset_seed"]]])
                 for s in members]
        assert size["entropy_rho"].value == pytest.approx(stats.spearmanr([s["entropy"] for s in members],
                                                                          means).statistic, nan_ok=True)
    text = (tmp_path / "findings.md").read_text()
    assert "## Collective variables at initialisation vs the mean test accuracy" in text
    assert "| 10 | 4 | 2 |" in text and "| S₀/ln n | 8 |" in text and "partial ρ, controlling for n" in text
    assert "steps of 1/360" in text
    assert (tmp_path / "figures" / "data_quality_authors_scatter.png").stat().st_size > 5000
