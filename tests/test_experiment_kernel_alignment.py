"""The kernel-alignment study's quick mode end to end: the sweep, its table, the analysis and the report."""

import pytest

from experiments import _common, kernel_alignment
from ntkcv.report import read_scalars
from ntkcv.studies import kernel_alignment as study
from ntkcv.sweep import expand, load_sweep, read_table


def test_kernel_alignment_quick(tmp_path):
    """The 64×64 network at η = 0.05 and 0.005, two seeds, 300 steps: the test alignment rises at both steps, more
    and with a larger kernel drift at the larger step, but not more at equal gradient-flow time."""
    assert kernel_alignment.main(["--quick", "--dir", str(tmp_path), "--workers", "2"]) == 0
    rows = read_table(tmp_path / "results.csv")
    assert len(rows) == 4 and all(row["status"] == "complete" for row in rows)
    findings = study.analyse(study.annotate(rows, tmp_path))
    small, large = findings.values["cells"]
    assert (small["learning_rate"], small["regime"]) == (0.005, "near-lazy")  # one network: its smaller step
    assert (large["learning_rate"], large["regime"]) == (0.05, "feature learning")
    assert large["delta"].low > 0.02 and large["train_delta"].low > large["delta"].low
    assert small["delta"].value < large["delta"].value and small["drift"].value < large["drift"].value
    assert 0 < large["initial"].value < 0.5 and large["accuracy"] > 0.8
    (comparison,) = findings.values["comparisons"]
    assert comparison["factor"] == "step" and comparison["delta"].value > 0 and comparison["drift"].value > 0
    # at equal gradient-flow time η·t (the larger step's run cut at step 30) the two steps align alike
    assert abs(comparison["equal_time"].value) < 0.2 * comparison["delta"].value
    steps, _ = read_scalars(tmp_path / "runs" / rows[0]["run_id"] / "ntkcv.h5")[study.SERIES[0]]
    assert {0, 1, 2, 5, 12, 26, 100, 200, 299} <= set(steps.tolist())  # log-spaced early steps, then every 100
    text = (tmp_path / "findings.md").read_text()
    assert "## Kernel–target alignment of the NTK during training" in text
    assert "**Reproduced.** The NTK's alignment with the labels on held-out points rises" in text
    for name in ("kernel_alignment.png", "kernel_alignment_drift.png"):
        assert (tmp_path / "figures" / name).stat().st_size > 5000


@pytest.mark.parametrize("quick, runs", [(False, 18), (True, 4)])
def test_the_configs_parse_with_the_documented_size(quick, runs):
    overrides = kernel_alignment.QUICK if quick else {}
    assert len(expand(load_sweep(_common.CONFIGS / "kernel_alignment.yaml", overrides))) == runs
