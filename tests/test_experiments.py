"""The experiment scripts' --quick modes end to end (sweep, table, figures, findings), and their full configs."""

import json

import numpy as np
import pytest

from experiments import (
    _common,
    data_quality,
    edge_of_stability,
    rnd_selection,
    time_evolution,
    time_evolution_authors,
    weight_spectra,
)
from ntkcv.config import load_config
from ntkcv.report import read_array
from ntkcv.studies import edge_of_stability as edge_study
from ntkcv.studies import rnd_selection as rnd_study
from ntkcv.studies import time_evolution as time_evolution_study
from ntkcv.studies import weight_spectra as weight_spectra_study
from ntkcv.sweep import expand, load_sweep, read_table
from ntkcv.train import train


@pytest.fixture(scope="module")
def time_evolution_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("experiments") / "time_evolution"
    assert time_evolution.main(["--quick", "--dir", str(directory), "--workers", "2"]) == 0
    return directory


def test_time_evolution_quick(time_evolution_dir):
    rows = read_table(time_evolution_dir / "results.csv")
    assert len(rows) == 12 and all(row["status"] in ("complete", "diverged") for row in rows)
    cells = time_evolution_study.analyse(rows).values["cells"]
    assert len(cells) == 4
    for cell in cells:
        assert cell["regime"] in time_evolution_study.REGIMES
        if cell["training"] == "cross_entropy + adam(0.001)":  # the leads: entropy rose in every such cell
            assert cell["regime"] == "rose" and cell["delta"].low > 0 and cell["seeds"] == 3
    text = (time_evolution_dir / "findings.md").read_text()
    assert "## Time evolution of the NTK entropy" in text and "| cross_entropy + adam(0.001) | 30 | 8 | 3 |" in text
    assert "Entropy falls during training in small networks" in text
    for name in ("time_evolution_regimes.png", "time_evolution_trajectories.png"):
        assert (time_evolution_dir / "figures" / name).stat().st_size > 5000


def test_weight_spectra_quick_reuses_the_time_evolution_sweep(time_evolution_dir, tmp_path, capsys):
    assert weight_spectra.main(["--quick", "--from", str(time_evolution_dir), "--dir", str(tmp_path / "ws")]) == 0
    assert "reusing the time-evolution sweep" in capsys.readouterr().out
    assert not (tmp_path / "ws").exists()  # nothing trained
    findings = weight_spectra_study.analyse(read_table(time_evolution_dir / "results.csv"))
    adam = next(g for g in findings.values["groups"] if g["group"].startswith("cross_entropy + adam"))
    assert (adam["runs"], adam["without_fit"]) == (3, 3)  # 256×2 has α; width 8 is too narrow for a fit
    assert "## Weight-spectrum exponents vs test accuracy" in (time_evolution_dir / "findings.md").read_text()
    assert (time_evolution_dir / "figures" / "weight_spectra.png").stat().st_size > 5000


def test_weight_spectra_runs_its_own_sweep_without_one_to_reuse(tmp_path):
    args = _common.parse(["--quick", "--dir", str(tmp_path)], "weight_spectra", None)
    sweep = _common.load("time_evolution", args, weight_spectra.QUICK, {"name": "weight_spectra"})
    assert sweep.name == "weight_spectra" and len(expand(sweep)) == 12
    assert not weight_spectra.reusable(tmp_path)


def test_data_quality_quick(tmp_path):
    assert data_quality.main(["--quick", "--dir", str(tmp_path), "--workers", "2"]) == 0
    rows = read_table(tmp_path / "results.csv")
    assert len(rows) == 10 and {row["config.train.seed"] for row in rows} == {0}
    assert len({row["effective_entropy.initial"] for row in rows}) == 10  # ten different subsets, one init
    text = (tmp_path / "findings.md").read_text()
    assert "| 30 | 10 |" in text and "ρ(S₀/ln n, acc)" in text
    assert any(verdict in text for verdict in ("**Reproduced.**", "**Not reproduced.**", "**Inconclusive.**"))
    assert (tmp_path / "figures" / "data_quality_scatter.png").stat().st_size > 5000


@pytest.mark.standard_dtype_promotion
def test_rnd_selection_quick(tmp_path):
    assert rnd_selection.main(["--quick", "--dir", str(tmp_path), "--workers", "2"]) == 0
    selections = json.loads((tmp_path / "selections.json").read_text())
    assert sorted((s["method"], s["seed"], len(s["indices"])) for s in selections) == sorted(
        (method, seed, 30) for method in ("rnd", "random") for seed in range(3))
    rows = rnd_study.annotate(read_table(tmp_path / "results.csv"), tmp_path)
    assert sorted(row["selection"] for row in rows) == ["random"] * 3 + ["rnd"] * 3
    (size,) = rnd_study.analyse(rows).values["sizes"]
    assert size["pairs"] == 3
    assert size["entropy_difference"].value > 0  # RND sets spread out: a flatter initial NTK spectrum
    text = (tmp_path / "findings.md").read_text()
    assert "## RND vs random data selection" in text and "RND − random" in text
    assert (tmp_path / "figures" / "rnd_selection.png").stat().st_size > 5000


def test_rnd_selection_sweep_has_one_run_per_selection():
    sweep = load_sweep(_common.CONFIGS / "rnd_selection.yaml", {**rnd_selection.QUICK, "grid.train.seed": [0]})
    selections = [{"method": "rnd", "seed": 0, "size": 2, "indices": [5, 1]},
                  {"method": "random", "seed": 0, "size": 2, "indices": [0, 9]}]
    runs = expand(rnd_selection.selection_sweep(sweep, selections))
    assert [(r.config.train.seed, r.config.data.indices, r.config.data.train_size) for r in runs] == [
        (0, (5, 1), None), (0, (0, 9), None)]
    with pytest.raises(ValueError, match=r"grid must have exactly the keys data\.train_size, train\.seed"):
        rnd_selection.select(load_sweep(_common.CONFIGS / "time_evolution.yaml"))


def test_edge_of_stability_quick(tmp_path):
    """One run at η = 0.06: the Gauss–Newton sharpness starts at 31, below 2/η = 33.3, rises to it and hovers."""
    assert edge_of_stability.main(["--quick", "--dir", str(tmp_path)]) == 0
    rows = edge_study.annotate(read_table(tmp_path / "results.csv"), tmp_path)
    (cell,) = edge_study.analyse(rows).values["cells"]
    assert cell["initial"] < cell["threshold"] == pytest.approx(2 / 0.06)
    assert cell["sharpening"].value > 1.1 and cell["reached"][1] == 1
    assert 0.95 < cell["edge"].value < 1.05 and 0.95 < cell["hessian_edge"].value < 1.05
    text = (tmp_path / "findings.md").read_text()
    assert "## Edge of stability" in text and "**Inconclusive.**" in text  # one seed: no interval to judge
    assert (tmp_path / "figures" / "edge_of_stability.png").stat().st_size > 5000


def test_time_evolution_on_the_authors_protocol_quick(tmp_path):
    """Four runs; the NTK is of the softmax outputs: its logged trace at step 0 is that of the initial network's
    probabilities, recomputed here."""
    import jax
    import jax.numpy as jnp

    import ntkcv
    from ntkcv.data import load_dataset
    from ntkcv.report import read_scalars
    from ntkcv.zoo import make_model

    assert time_evolution_authors.main(["--quick", "--dir", str(tmp_path)]) == 0
    rows = read_table(tmp_path / "results.csv")
    assert len(rows) == 4 and all(row["status"] == "complete" for row in rows)
    findings = time_evolution_study.analyse(rows)
    assert len(findings.values["cells"]) == 2 and len(findings.claims) == 3
    run = next(row for row in rows if row["config.model.widths"] == "[12, 12, 12]" and row["config.train.seed"] == 0)
    steps, traces = read_scalars(tmp_path / "runs" / run["run_id"] / "ntkcv.h5")["cv/train/trace"]
    assert list(steps[:3]) == [0, 1, 2]  # dense early snapshots
    data = load_dataset("digits", train_size=200, seed=0)
    module = make_model("mlp", num_outputs=10, widths=(12, 12, 12), activation="relu")
    x = jnp.asarray(data.x_train)
    params = jax.jit(module.init)(jax.random.key(0), x[:1])["params"]
    kernel = ntkcv.ntk_fn(lambda p, x: jax.nn.softmax(module.apply({"params": p}, x)))(params, x)
    assert traces[0] == pytest.approx(float(jnp.trace(kernel)), rel=1e-4)
    assert (tmp_path / "figures" / "time_evolution_trajectories.png").stat().st_size > 5000


@pytest.mark.parametrize("study, runs", [("time_evolution", 288), ("data_quality", 120), ("rnd_selection", 48),
                                         ("edge_of_stability", 9), ("time_evolution_authors", 48)])
def test_full_configs_parse_with_the_documented_size(study, runs):
    assert len(expand(load_sweep(_common.CONFIGS / f"{study}.yaml"))) == runs  # rnd: grid points, 2 runs each


@pytest.mark.standard_dtype_promotion
def test_probe_set_train_builds_the_ntk_on_the_training_set(tmp_path):
    config = load_config(None, {"data.train_size": 20, "data.probe_set": "train", "model.widths": [16],
                                "train.steps": 3, "train.batch_size": 20, "monitor.every_steps": 1,
                                "monitor.probe_sets": ["train"], "output.tensorboard": False,
                                "output.progress": False, "output.dir": str(tmp_path)})
    steps, spectra = read_array(train(config)["hdf5"], "cv/spectrum")
    assert list(steps) == [0, 1, 2] and spectra.shape == (3, 20)  # one eigenvalue per training point
    assert np.all(np.isfinite(spectra))
