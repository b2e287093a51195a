"""The edge-of-stability study's summary of one run, on sharpness series with known answers."""

import math

import numpy as np
import pytest

from ntkcv.studies import edge_of_stability
from tests.studies.rows import row


def test_summary_of_a_run_that_reaches_the_edge():
    steps = np.arange(0, 200, 10)
    sharpness = np.concatenate([np.linspace(30, 40, 10), [40.2, 39.8] * 5])  # 2/η = 40; 38.9 ≥ 0.95·40 at step 80
    loss_steps = np.arange(200)
    loss = 1.0 / (1 + loss_steps) + 0.01 * (loss_steps % 2)  # rises at every odd step
    summary = edge_of_stability.summarise({"curvature/ggn_max": (steps, sharpness),
                                           "curvature/hessian_max": (steps, 1.1 * sharpness),
                                           "train/loss": (loss_steps, loss)}, 0.05)
    assert summary["initial"] == 30 and summary["peak"] == pytest.approx(40.2)
    assert summary["reached"] == 80
    assert summary["edge"] == pytest.approx(np.median(sharpness[8:]) / 40)
    assert summary["hessian_edge"] == pytest.approx(1.1 * np.median(sharpness[8:]) / 40)
    assert summary["loss_rises"] == pytest.approx(0.5, abs=0.01)


def test_a_run_below_the_edge_has_no_edge_ratio_and_failed_runs_are_left_out():
    summary = edge_of_stability.summarise({"curvature/ggn_max": (np.arange(3), np.array([10.0, 11, 12]))}, 0.05)
    assert math.isnan(summary["reached"]) and math.isnan(summary["edge"])  # never reached
    assert all(math.isnan(v) for v in edge_of_stability.summarise({}, 0.05).values())
    rows = [row(learning_rate=0.05, seed=seed, initial=30.0, peak=41.0, reached=90.0, edge=1.0, hessian_edge=1.0,
                loss_rises=0.1) for seed in range(3)]
    failed = {"run_id": "x", "status": "failed", "initial": math.nan}
    findings = edge_of_stability.analyse([*rows, failed])
    (cell,) = findings.values["cells"]
    assert cell["seeds"] == 3 and cell["edge"].value == 1.0 and cell["sharpening"].value == pytest.approx(41 / 30)
    assert any("1 runs failed" in note for note in findings.notes)
