"""The phase-diagram experiment end to end in its quick mode, its full sweep, and the study on synthetic rows with
known answers: the grid assembly (missing cells, diverged and failed runs), the fits and the verdicts."""

import json
import math

import numpy as np
import pytest

from experiments import _common, phase_diagram
from ntkcv.report import read_scalars
from ntkcv.studies import phase_diagram as study
from ntkcv.sweep import expand, load_sweep, read_table
from tests.studies.rows import row


def softmax_ntk_cvs(widths):
    """S and tr/N of the NTK of the softmax outputs, summed over the outputs, of the initial ReLU MLP of seed 0 on the
    200 quick-mode training digits: a dense float64 Jacobian (``jax.jacrev``) and ``numpy.linalg.eigvalsh``."""
    import jax
    import jax.numpy as jnp

    from ntkcv.data import load_dataset
    from ntkcv.zoo import make_model

    x = load_dataset("digits", train_size=200, seed=0).x_train
    module = make_model("mlp", num_outputs=10, widths=widths, activation="relu")
    params = jax.jit(module.init)(jax.random.key(0), jnp.asarray(x[:1]))["params"]
    with jax.enable_x64(True):
        params64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        jacobian = jax.jacrev(lambda p: jax.nn.softmax(module.apply({"params": p}, jnp.asarray(x, jnp.float64))))(
            params64)
        flat = np.concatenate([np.asarray(j).reshape(200, 10, -1) for j in jax.tree.leaves(jacobian)], axis=-1)
    kernel = np.einsum("ikp,jkp->ij", flat, flat)
    p = np.clip(np.linalg.eigvalsh(kernel), 0, None)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log(p)).sum()), float(np.trace(kernel) / 200)


def test_phase_diagram_quick(tmp_path):
    """Widths 4 and 50 × depths 1 and 2, one seed, 30 steps: the table's numbers are the results table's, the NTK is
    on all 200 training points at the first and the last step (at the first, that of an independent float64
    Jacobian), and both figures are written."""
    assert phase_diagram.main(["--quick", "--dir", str(tmp_path), "--workers", "2"]) == 0
    rows = read_table(tmp_path / "results.csv")
    assert len(rows) == 4 and all(r["status"] == "complete" for r in rows)
    grid = study.analyse(rows).values["grid"]
    assert (grid.widths, grid.depths, grid.missing) == ((4, 50), (1, 2), ())
    text = (tmp_path / "findings.md").read_text()
    assert "## The phase diagram: NTK entropy and trace over width × depth" in text
    for r in rows:
        widths = json.loads(r["config.model.widths"])
        initial, final, trace = r["entropy.initial"], r["entropy.final"], r["mean_trace.initial"]
        assert f"| {widths[0]} | {len(widths)} | 1 | {initial:.3f} | {final:.3f} | {final - initial:+.3f} | " \
               f"{trace:.3g} | {r['mean_trace.final']:.3g} | {r['train.loss.final']:.3g} |" in text
        assert initial == pytest.approx(r["effective_entropy.initial"] * math.log(200), rel=1e-5)  # N = 200 probes
        steps, _ = read_scalars(tmp_path / "runs" / r["run_id"] / "ntkcv.h5")["cv/entropy"]
        assert list(steps) == [0, 29]
    run = next(r for r in rows if r["config.model.widths"] == "[50, 50]")
    entropy, mean_trace = softmax_ntk_cvs((50, 50))
    assert (run["entropy.initial"], run["mean_trace.initial"]) == (pytest.approx(entropy, rel=1e-4),
                                                                   pytest.approx(mean_trace, rel=1e-4))
    for name in ("phase_diagram.png", "phase_diagram_fits.png"):
        assert (tmp_path / "figures" / name).stat().st_size > 5000


def test_full_sweep_is_the_papers_grid():
    runs = expand(load_sweep(_common.CONFIGS / "phase_diagram.yaml"))
    assert len(runs) == 90
    networks = [(r.config.model.widths[0], len(r.config.model.widths)) for r in runs]
    assert set(networks) == {(w, d) for w in (4, 12, 50, 100, 500, 1000) for d in (1, 2, 3, 5, 10)}
    assert networks[:2] == [(1000, 10), (1000, 10)]  # the most expensive first
    config = runs[0].config
    assert (config.train.steps, config.train.batch_size, config.monitor.every_steps) == (700, 128, 700)
    assert (config.model.activation, config.monitor.outputs, config.data.probe_set) == ("relu", "softmax", "train")


def synthetic(width, depth, seed, *, status="complete", change_sign=1, **metrics):
    """S₀ = (1 + seed/10) · width^0.2 · depth^0.1 and ΔS = ±(−0.5 + 0.2 ln width + 0.1 ln depth), exactly."""
    initial = (1 + seed / 10) * width**0.2 * depth**0.1
    change = change_sign * (-0.5 + 0.2 * math.log(width) + 0.1 * math.log(depth))
    values = {"entropy__initial": initial, "entropy__final": initial + change, "mean_trace__initial": 10.0 * width,
              "mean_trace__final": 0.1 * width, "train__loss__final": 0.01, "train__test_accuracy__final": 0.9}
    return row(widths=(width,) * depth, seed=seed, status=status, config__model__activation="relu",
               config__monitor__outputs="softmax", **{**values, **metrics})


def test_grid_reports_missing_cells_and_diverged_and_failed_runs():
    rows = [synthetic(w, d, s) for w in (4, 50, 1000) for d in (1, 3) for s in range(3) if (w, d) != (50, 3)
            and (w, d, s) not in {(1000, 3, 1), (4, 1, 2), (50, 1, 0)}]
    rows += [synthetic(1000, 3, 1, status="diverged", entropy__final=math.nan),
             {**synthetic(4, 1, 2, status="failed"), "entropy.initial": None, "entropy.final": None},
             synthetic(50, 1, 0, entropy__final=math.inf)]  # complete, but its kernel blew up: diverged
    grid = study.assemble(rows)
    assert (grid.widths, grid.depths, grid.missing) == ((4, 50, 1000), (1, 3), ((50, 3),))
    assert (grid.cells[(1000, 3)].diverged, grid.cells[(4, 1)].failed, grid.cells[(50, 1)].diverged) == ((1,), (2,),
                                                                                                         (0,))
    for (width, depth), seeds in (((1000, 3), (0, 2)), ((4, 1), (0, 1)), ((50, 1), (1, 2)), ((4, 3), (0, 1, 2))):
        cell = grid.cells[(width, depth)]
        assert [run["seed"] for run in cell.runs] == list(seeds)
        expected = np.mean([(1 + s / 10) * width**0.2 * depth**0.1 for s in seeds])
        assert cell.estimates["entropy_initial"].value == pytest.approx(expected)
        assert cell.estimates["entropy_initial"].n == len(seeds)
    matrix = grid.matrix("entropy_initial")
    assert matrix.shape == (2, 3) and math.isnan(matrix[1, 1]) and np.isfinite(np.delete(matrix.ravel(), 4)).all()
    findings = study.analyse(rows)
    notes = " ".join(findings.notes)
    assert "Grid points without a run (missing, blank in the figure): 50×3." in notes
    assert "Runs that diverged are left out of their cell's means: 50×1 (seeds 0); 1000×3 (seeds 1)." in notes
    assert "Runs that failed are left out of their cell's means: 4×1 (seeds 2)." in notes
    cells = findings.tables[0].rows
    assert [r[:3] + r[-1:] for r in cells if r[:2] in (("1000", "3"), ("4", "1"))] == [
        ("4", "1", "2", "0 / 1"), ("1000", "3", "2", "1 / 0")]


@pytest.mark.parametrize("change_sign, expected", [(1, "reproduced"), (-1, "not reproduced")])
def test_fits_recover_the_laws_and_judge_the_claims(change_sign, expected):
    rows = [synthetic(w, d, s, change_sign=change_sign) for w in (4, 12, 100, 1000) for d in (1, 2, 5, 10)
            for s in range(3)]
    findings = study.analyse(rows)
    for fit in findings.values["fits"]:
        exponent = fit["entropy_initial"].power_law.exponent
        assert exponent.value == pytest.approx(0.2 if fit["along"] == "width" else 0.1)
        assert exponent.low > 0 and exponent.n == 3  # seeds are the bootstrap groups
        assert fit["entropy_initial"].better == "power law"
        assert fit["entropy_change"].slope.value == pytest.approx(change_sign * (0.2 if fit["along"] == "width"
                                                                                 else 0.1))
    assert [c.verdict for c in findings.claims[:2]] == ["reproduced", "reproduced"]  # S₀ along width, depth
    assert findings.claims[4].verdict == expected  # ΔS < 0 at 4×1 and > 0 at 1000×10, or the reverse
    assert [c.verdict for c in findings.claims[5:7]] == [expected, expected]
    assert findings.claims[7].verdict != "reproduced"  # S₀ is an exact power law here


def test_figures_with_a_missing_cell_and_a_diverged_run(tmp_path):
    rows = [synthetic(w, d, s) for w in (4, 100) for d in (1, 2) for s in range(2) if (w, d) != (100, 2)]
    rows.append(synthetic(4, 2, 2, status="diverged", entropy__final=math.nan))
    paths = study.figures(rows, tmp_path)
    assert [p.name for p in paths] == ["phase_diagram.png", "phase_diagram_fits.png"]
    assert all(p.stat().st_size > 5000 for p in paths)


def test_rows_that_are_not_one_phase_diagram_are_refused():
    with pytest.raises(ValueError, match=r"equal hidden widths .* model.widths \[8, 16\]"):
        study.assemble([row(widths=(8, 16), config__model__activation="relu")])
    mixed = [synthetic(4, 1, 0), {**synthetic(4, 1, 1), "config.model.activation": "tanh"}]
    with pytest.raises(ValueError, match=r"one model\.activation; the runs have relu, tanh"):
        study.assemble(mixed)
    with pytest.raises(ValueError, match=r"no column 'mean_trace\.initial'"):
        study.analyse([{k: v for k, v in synthetic(4, 1, 0).items() if not k.startswith("mean_trace")}])
