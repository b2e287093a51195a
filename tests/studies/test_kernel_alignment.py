"""The kernel-alignment study's analysis on synthetic rows with known answers."""

import math

import numpy as np
import pytest

from ntkcv.studies import kernel_alignment
from tests.studies.rows import row

NARROW, WIDE = (64, 64), (1024, 1024)
# (network, learning rate) -> (ΔA_c on the test probes, final drift); seeds add the same noise in every cell, so the
# paired differences are exact
CELLS = {(NARROW, 0.05): (0.30, 0.8), (NARROW, 0.005): (0.10, 0.3), (WIDE, 0.003125): (0.05, 0.1),
         (WIDE, 0.0003125): (0.01, 0.02)}
NOISE = (-0.01, 0.0, 0.01)


def _rows(cells=CELLS, changes=None):
    rows = []
    for (widths, rate), (delta, drift) in cells.items():
        for seed, noise in enumerate(NOISE):
            values = {"test__centred_target_alignment__initial": 0.2,
                      "test__centred_target_alignment__final": 0.2 + delta + noise,
                      "test__centred_target_alignment__max": 0.22 + delta + noise,
                      "train__centred_target_alignment__initial": 0.25,
                      "train__centred_target_alignment__final": 0.25 + 2 * delta,
                      "test__target_alignment__initial": 0.6, "test__target_alignment__final": 0.6 + delta / 2,
                      "test__relative_distance__final": drift + noise / 10, "train__test_accuracy__final": 0.9}
            values.update((changes or {}).get((widths, rate, seed), {}))
            rows.append(row(widths=widths, learning_rate=rate, seed=seed, loss="mse", optimizer="sgd", **values))
    return rows


def test_cells_regimes_and_comparisons_have_the_known_values():
    findings = kernel_alignment.analyse(_rows())
    cells = findings.values["cells"]
    assert [(c["architecture"], c["learning_rate"], c["step"], c["regime"]) for c in cells] == [
        ("64×2", 0.005, 0, "intermediate"), ("64×2", 0.05, 1, "feature learning"),
        ("1024×2", 0.0003125, 0, "near-lazy"), ("1024×2", 0.003125, 1, "intermediate")]
    feature = cells[1]
    assert feature["initial"].value == pytest.approx(0.2) and feature["final"].value == pytest.approx(0.5)
    assert feature["delta"].value == pytest.approx(0.30) and feature["delta"].low > 0.28
    assert feature["peak"].value == pytest.approx(0.32) and feature["train_delta"].value == pytest.approx(0.60)
    assert feature["uncentred_delta"].value == pytest.approx(0.15)
    assert feature["drift"].value == pytest.approx(0.8) and feature["seeds"] == 3 and feature["diverged"] == 0
    comparisons = {(c["factor"], c["more"], c["less"]): c for c in findings.values["comparisons"]}
    expected = {("step", "64×2, η = 0.05", "64×2, η = 0.005"): (0.20, 0.5),
                ("step", "1024×2, η = 0.003125", "1024×2, η = 0.0003125"): (0.04, 0.08),
                ("width", "64×2, η = 0.005", "1024×2, η = 0.0003125"): (0.09, 0.28),
                ("width", "64×2, η = 0.05", "1024×2, η = 0.003125"): (0.25, 0.7)}
    assert set(comparisons) == set(expected)
    for key, (delta, drift) in expected.items():
        estimate = comparisons[key]["delta"]
        assert (estimate.value, estimate.low, estimate.high) == pytest.approx((delta,) * 3)  # the noise cancels
        assert comparisons[key]["drift"].value == pytest.approx(drift) and comparisons[key]["delta"].n == 3
    rise, ordering, premise = findings.claims
    assert rise.verdict == "reproduced" and "in 3 of 3 cells away from the near-lazy one" in rise.evidence
    assert ordering.verdict == "reproduced" and "in 4 of 4 paired comparisons" in ordering.evidence
    assert premise.verdict == "reproduced"
    text = findings.markdown()
    assert "| 64×2 | 0.05 | feature learning | 3 | 0.200 | 0.500 | +0.300 [+0.290, +0.310] | +0.320 [" in text
    assert "| 64×2: η 0.005 → 0.05 | 64×2, η = 0.05 | 64×2, η = 0.005 | +0.200 [+0.200, +0.200] |" in text


def test_a_wide_network_that_aligns_more_and_a_cell_that_falls_are_reported_against_the_claims():
    cells = {**CELLS, (WIDE, 0.003125): (0.40, 0.1), (NARROW, 0.005): (-0.10, 0.3)}
    findings = kernel_alignment.analyse(_rows(cells))
    rise, ordering, premise = findings.claims
    assert rise.verdict == "partly reproduced" and "in 2 of 3 cells" in rise.evidence
    assert "negative in 1" in rise.evidence
    assert ordering.verdict == "partly reproduced" and "in 2 of 4 paired comparisons" in ordering.evidence
    assert ("significantly smaller at 64×2, η = 0.005 → 1024×2, η = 0.0003125, "
            "64×2, η = 0.05 → 1024×2, η = 0.003125 (") in ordering.evidence
    assert premise.verdict == "reproduced"


def test_diverged_and_failed_runs_are_left_out_and_one_seed_is_inconclusive():
    rows = _rows(changes={(NARROW, 0.05, 2): {"test__centred_target_alignment__final": math.nan}})
    rows[2]["status"] = "diverged"  # (64×2, 0.05), seed 2: its final CV is not finite anyway
    rows.append({"run_id": "broken", "status": "failed", "error": "boom"})
    findings = kernel_alignment.analyse(rows)
    feature = next(c for c in findings.values["cells"] if c["regime"] == "feature learning")
    assert feature["seeds"] == 3 and feature["diverged"] == 1 and feature["delta"].n == 2
    step = next(c for c in findings.values["comparisons"] if c["more"] == "64×2, η = 0.05" and c["factor"] == "step")
    assert step["delta"].n == 2  # paired over the seeds complete in both cells
    assert any("1 runs diverged" in note for note in findings.notes)
    assert any("1 runs failed" in note for note in findings.notes)
    single = kernel_alignment.analyse([r for r in _rows() if r["config.train.seed"] == 0])
    assert [c.verdict for c in single.claims] == ["inconclusive"] * 3  # one seed: no intervals
    assert "3 cells without an interval" in single.claims[0].evidence


def test_a_table_without_the_centred_alignment_is_an_error_that_says_what_to_log():
    with pytest.raises(ValueError, match="centred_target_alignment"):
        kernel_alignment.analyse([row(entropy__initial=1.0)])


def test_figures_without_the_runs_stores(tmp_path):
    rows = _rows()
    assert [p.name for p in kernel_alignment.figures(rows, tmp_path)] == ["kernel_alignment_drift.png"]
    paths = kernel_alignment.figures(rows, tmp_path / "with", sweep_dir=tmp_path)  # no runs/: empty panels
    assert [p.name for p in paths] == ["kernel_alignment.png", "kernel_alignment_drift.png"]
    assert all(p.stat().st_size > 5000 for p in paths)


def test_the_step_comparison_at_equal_gradient_flow_time_reads_the_annotated_curves():
    rows = _rows()
    for r in rows:  # (64×2, 0.05) reaches A_c = 0.3 at step 200; (64×2, 0.005) ends at 0.28 after 2000 steps
        if r["config.model.widths"] == "[64, 64]":
            r[kernel_alignment.CURVE] = ((np.array([0.0, 100, 200, 1999]), np.array([0.2, 0.25, 0.3, 0.5]))
                                         if r["config.optimizer.learning_rate"] == 0.05 else
                                         (np.array([0.0, 1999]), np.array([0.2, 0.28])))
    findings = kernel_alignment.analyse(rows)
    comparisons = findings.values["comparisons"]
    assert ("at equal gradient-flow time η·t the larger step's ΔA_c is significantly larger in 1 and smaller in 0 "
            "of 1 step comparisons: 64×2: η 0.005 → 0.05: +0.020 [+0.020, +0.020]") in findings.claims[1].evidence
    narrow = next(c for c in comparisons if c["label"] == "64×2: η 0.005 → 0.05")
    # η·t of the smaller step at step 1999 is reached at step 199.9 by the larger: A_c = 0.25 + 0.05 · 0.999
    assert narrow["equal_time"].value == pytest.approx(0.25 + 0.05 * 0.999 - 0.2 - 0.08) and narrow["equal_time"].n == 3
    wide = next(c for c in comparisons if c["label"].startswith("1024×2: η"))
    assert math.isnan(wide["equal_time"].value)  # no curves: not annotated
    assert all(math.isnan(c["equal_time"].value) for c in comparisons if c["factor"] == "width")


def test_annotate_reads_the_curve_from_each_run_store(tmp_path):
    from ntkcv.sinks import HDF5Sink

    (tmp_path / "runs" / "a").mkdir(parents=True)
    sink = HDF5Sink(tmp_path / "runs" / "a" / "ntkcv.h5")
    for step, value in ((0, 0.2), (10, 0.3), (5, 0.25)):
        sink.write_scalars(step, {kernel_alignment.SERIES[0]: value, "train/loss": 1.0})
    sink.close()
    annotated = kernel_alignment.annotate([{"run_id": "a"}, {"run_id": "missing"}], tmp_path)
    steps, values = annotated[0][kernel_alignment.CURVE]
    assert steps.tolist() == [0, 5, 10] and values.tolist() == pytest.approx([0.2, 0.25, 0.3])
    assert kernel_alignment.CURVE not in annotated[1]
