"""The lazy-regime experiment end to end in its quick mode, and the size of its full sweep."""

import pytest

from experiments import _common, lazy_regime
from ntkcv.studies import lazy_regime as study
from ntkcv.sweep import expand, load_sweep, read_table


@pytest.mark.standard_dtype_promotion
def test_lazy_regime_quick(tmp_path, capsys):
    """Widths 64 and 512, one seed, 100 steps, three arms: the lazy arm's kernel change falls with width, the
    catapult arm's does not, and each NTK-parameterised run is in the regime its step size was chosen for."""
    assert lazy_regime.main(["--quick", "--dir", str(tmp_path)]) == 0
    assert "λ∞ = " in capsys.readouterr().out
    rows = study.annotate(read_table(tmp_path / "results.csv"), tmp_path)
    assert len(rows) == 6 and all(row["status"] == "complete" for row in rows)
    lazy, catapult, adam = study.analyse(rows).values["arms"]
    assert (lazy["regime"], catapult["regime"], adam["regime"]) == ("lazy", "catapult", "adaptive")
    assert catapult["learning_rate"] == pytest.approx(3 * lazy["learning_rate"], rel=1e-3)
    for arm, factor in ((lazy, 0.5), (catapult, 1.5)):
        narrow_run, wide_run = sorted(arm["runs"], key=lambda run: run["width"])
        # λ₀ measured at step 0 lies above the infinite-width λ∞ the step came from, closer at the wider network
        assert 2 * factor < wide_run["eta_lambda"] < narrow_run["eta_lambda"] < 1.8 * 2 * factor
        assert wide_run["eta_lambda"] < 1.3 * 2 * factor
    narrow, wide = (w["kernel_change"].value for w in lazy["widths"])
    assert wide < narrow / 4  # 8 times wider: at w^(-1/2) it would be 0.35 times, at w^(-1) 0.125
    catapult_narrow, catapult_wide = (w["kernel_change"].value for w in catapult["widths"])
    assert catapult_wide > 10 * wide and catapult_wide > catapult_narrow / 2
    text = (tmp_path / "findings.md").read_text()
    assert "## The lazy regime: kernel change against width" in text and "**Inconclusive.**" in text  # one seed
    assert (tmp_path / "figures" / "lazy_regime.png").stat().st_size > 5000


def test_full_sweep_size_and_step_sizes():
    sweep = load_sweep(_common.CONFIGS / "lazy_regime.yaml")
    assert len(expand(sweep)) == 18  # the Adam arm; the script adds the two gradient-descent arms
    (low, high) = lazy_regime.arms(4.0)
    assert (low, high) == ({"optimizer.learning_rate": 0.25}, {"optimizer.learning_rate": 0.75})
