"""Each study's analyse() on synthetic rows with known answers, its figures, and the sweep report."""

import csv
import json
import math

import numpy as np
import pytest

from ntkcv.cli import main as cli
from ntkcv.studies import data_quality, make_sweep_report, rnd_selection, time_evolution, weight_spectra
from tests.studies.rows import row


def _time_evolution_rows():
    """Per seed: width 8 falls clearly, 64 stays (changes of either sign), 512×3 rises clearly, 1024 diverges in
    one seed of three."""
    rows = []
    for seed, noise in enumerate((-0.004, 0.0, 0.004)):
        rows += [
            row(widths=(8,), seed=seed, effective_entropy__initial=0.5, effective_entropy__final=0.35 + noise,
                trace__initial=10.0, trace__final=100.0, train__test_accuracy__final=0.6),
            row(widths=(64,), seed=seed, effective_entropy__initial=0.4, effective_entropy__final=0.4 + 10 * noise,
                trace__initial=10.0, trace__final=10.0, train__test_accuracy__final=0.7),
            row(widths=(512, 512, 512), seed=seed, effective_entropy__initial=0.4,
                effective_entropy__final=0.6 + noise, trace__initial=10.0, trace__final=1.0,
                train__test_accuracy__final=0.8),
            row(widths=(1024,), seed=seed, status="diverged" if seed == 1 else "complete",
                effective_entropy__initial=0.4, effective_entropy__final=math.nan if seed == 1 else 0.5,
                trace__initial=10.0, trace__final=10.0, train__test_accuracy__final=0.5),
        ]
    return rows


def test_time_evolution_regimes_and_claims():
    findings = time_evolution.analyse(_time_evolution_rows())
    cells = {c["architecture"]: c for c in findings.values["cells"]}
    assert [c["architecture"] for c in findings.values["cells"]] == ["8", "64", "1024", "512×3"]
    assert cells["8"]["regime"] == "fell" and cells["8"]["delta"].high < 0
    assert cells["8"]["delta"].value == pytest.approx(-0.15)
    assert cells["64"]["regime"] == "stayed" and cells["64"]["delta"].low <= 0 <= cells["64"]["delta"].high
    assert cells["512×3"]["regime"] == "rose" and cells["512×3"]["delta"].low > 0
    assert cells["1024"]["regime"] == "diverged" and cells["1024"]["diverged"] == 1
    assert cells["1024"]["delta"].n == 2  # ΔS over the seeds that did not diverge is still reported
    assert cells["8"]["log10_trace_ratio"] == pytest.approx(1.0)
    compression, structure, transient = findings.claims
    assert compression.verdict == "reproduced" and "smallest network (8)" in compression.evidence
    assert transient.verdict == "inconclusive"  # no minima logged: no dip to judge
    assert structure.verdict == "reproduced" and "largest network (512×3)" in structure.evidence
    text = findings.markdown()
    assert "**Reproduced.** Entropy falls" in text and "| **diverged** | n/a | n/a | n/a | 1/3 |" in text


def test_time_evolution_finds_a_transient_dip_that_delta_s_misses():
    """Width 8 dips by 0.1 and recovers (ΔS ≈ 0: 'stayed'); width 64 only rises: its minimum is the start. Two probe
    sets: the training set's columns are read."""
    rows = []
    for seed, noise in enumerate((-0.004, 0.0, 0.004)):
        rows += [row(widths=(8,), seed=seed, train__effective_entropy__initial=0.5,
                     train__effective_entropy__min=0.4 + noise, train__effective_entropy__argmin_step=20 + seed,
                     train__effective_entropy__final=0.5 + noise, train__trace__initial=1.0, train__trace__final=1.0),
                 row(widths=(64,), seed=seed, train__effective_entropy__initial=0.4,
                     train__effective_entropy__min=0.4, train__effective_entropy__argmin_step=0,
                     train__effective_entropy__final=0.6 + noise, train__trace__initial=1.0,
                     train__trace__final=1.0)]
    findings = time_evolution.analyse(rows)
    cells = {c["architecture"]: c for c in findings.values["cells"]}
    assert cells["8"]["regime"] == "stayed" and cells["8"]["transient"]
    assert cells["8"]["dip"].value == pytest.approx(-0.1) and cells["8"]["recovery"].value == pytest.approx(0.1)
    assert cells["8"]["dip_step"] == pytest.approx(21)
    assert not cells["64"]["transient"] and math.isnan(cells["64"]["dip_step"])
    assert findings.claims[2].verdict == "reproduced" and "minimum at step 21" in findings.claims[2].evidence


def test_time_evolution_counts_a_diverged_cell_without_judging_it():
    rows = [r for r in _time_evolution_rows() if r["config.model.widths"] != "[512, 512, 512]"]
    for r in rows:
        if r["config.model.widths"] == "[1024]":
            r["status"], r["effective_entropy.final"] = "diverged", math.nan
    findings = time_evolution.analyse(rows)
    assert findings.claims[1].verdict == "inconclusive"
    assert "1 diverged" in findings.claims[1].evidence


def test_time_evolution_names_the_missing_column():
    with pytest.raises(ValueError, match=r"no column 'effective_entropy\.initial'.*monitor\.cvs"):
        time_evolution.analyse([row(trace__initial=1.0)])


def test_data_quality_monotone_entropy_gives_rho_one():
    rng = np.random.default_rng(0)
    rows = []
    for n in (30, 100):
        for subset in range(12):
            accuracy = 0.5 + 0.02 * subset + (0.1 if n == 100 else 0.0)
            rows.append(row(train_size=n, seed=0, effective_entropy__initial=0.3 + 0.01 * subset ** 2,
                            trace__initial=100.0 - subset, train__test_accuracy__final=accuracy))
    rows.append(row(train_size=30, status="diverged", effective_entropy__initial=0.1, trace__initial=1.0,
                    train__test_accuracy__final=math.nan))
    rng.shuffle(rows)
    findings = data_quality.analyse(rows)
    sizes = findings.values["sizes"]
    assert [s["n"] for s in sizes] == [30, 100] and [s["subsets"] for s in sizes] == [12, 12]
    assert sizes[0]["diverged"] == 1
    for s in sizes:
        assert (s["entropy_rho"].value, s["entropy_rho"].low) == pytest.approx((1.0, 1.0))
        assert s["trace_rho"].value == pytest.approx(-1.0)
    entropy, trace = findings.claims
    assert entropy.verdict == "reproduced"
    assert trace.verdict == "not reproduced" and "significantly negative at n=30, n=100" in trace.evidence


def _selection_rows(difference: float):
    rows = []
    for seed in range(6):
        for method, shift in (("rnd", difference), ("random", 0.0)):
            rows.append({**row(train_size=None, seed=seed, indices=[seed, 100 + seed] if method == "rnd" else [seed],
                               effective_entropy__initial=0.4 + shift + 0.001 * seed,
                               trace__initial=10.0 * (1 + shift + 0.01 * seed),
                               train__test_accuracy__final=0.7 - shift + 0.01 * (seed % 3)), "selection": method})
    return rows


def test_rnd_selection_paired_differences():
    rows = _selection_rows(0.05)
    for r in rows:  # equal sizes, as the experiment makes them
        r["config.data.indices"] = json.dumps([r["config.train.seed"] + (100 if r["selection"] == "rnd" else 0),
                                               200 + r["config.train.seed"]])
    findings = rnd_selection.analyse(rows)
    (size,) = findings.values["sizes"]
    assert size["n"] == 2 and size["pairs"] == 6
    assert size["entropy_difference"].value == pytest.approx(0.05)
    assert size["entropy_difference"].low == pytest.approx(0.05)
    assert size["accuracy_difference"].value == pytest.approx(-0.05)
    entropy, trace, accuracy = findings.claims
    assert (entropy.verdict, trace.verdict, accuracy.verdict) == ("reproduced", "reproduced", "not reproduced")
    assert "RND is" not in accuracy.evidence and "significantly negative at n=2" in accuracy.evidence


def test_rnd_selection_labels_rows_from_the_selections_file(tmp_path):
    rows = [row(train_size=None, indices=[3, 1]), row(train_size=None, indices=[2, 5]), row(train_size=30)]
    rnd_selection.write_selections(tmp_path, [{"method": "rnd", "seed": 0, "size": 2, "indices": np.array([3, 1])},
                                              {"method": "random", "seed": 0, "size": 2, "indices": [2, 5]}])
    assert [r["selection"] for r in rnd_selection.annotate(rows, tmp_path)] == ["rnd", "random", None]
    with pytest.raises(ValueError, match="call annotate"):
        rnd_selection.analyse(rows)
    with pytest.raises(FileNotFoundError, match=r"selections\.json"):
        rnd_selection.annotate(rows, tmp_path / "elsewhere")


def test_weight_spectra_smaller_alpha_with_higher_accuracy_reproduces():
    rows = []
    for i, widths in enumerate([(16,), (64,), (256,), (1024,), (64, 64)]):
        for seed in range(2):
            accuracy = 0.6 + 0.05 * i + 0.01 * seed
            rows.append(row(widths=widths, seed=seed, weights__alpha__final=6.0 - accuracy * 4,
                            weights__alpha_weighted__final=1.0 + accuracy, train__test_accuracy__final=accuracy))
    rows.append(row(widths=(8,), train__test_accuracy__final=0.5))  # no layer wide enough for a fit
    findings = weight_spectra.analyse(rows)
    (group,) = findings.values["groups"]
    assert group["runs"] == 10 and group["without_fit"] == 1
    assert group["alpha_rho"].value == pytest.approx(-1.0) and group["alpha_rho"].high == pytest.approx(-1.0)
    assert group["alpha_weighted_rho"].value == pytest.approx(1.0)
    alpha, weighted = findings.claims
    assert alpha.verdict == "reproduced" and weighted.verdict == "not reproduced"


def _write_sweep(sweep_dir, name, rows):
    sweep_dir.mkdir(parents=True)
    (sweep_dir / "sweep.json").write_text(json.dumps({"sweep": {"name": name}, "run_ids": [r["run_id"] for r in rows]}))
    columns = list(dict.fromkeys(key for r in rows for key in r))
    with open(sweep_dir / "results.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, columns)
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)


def test_sweep_report_writes_findings_and_figures(tmp_path):
    rows = _time_evolution_rows()
    for r in rows:
        r["weights.alpha.final"], r["weights.alpha_weighted.final"] = 3.0 - r["train.test_accuracy.final"], 1.0
    _write_sweep(tmp_path / "sweep", "time_evolution", rows)
    path, findings = make_sweep_report(tmp_path / "sweep")
    assert [f.study for f in findings] == ["time_evolution", "weight_spectra"]
    text = path.read_text()
    assert "## Time evolution of the NTK entropy" in text and "## Weight-spectrum exponents" in text
    assert "![time_evolution_regimes](figures/time_evolution_regimes.png)" in text
    for name in ("time_evolution_regimes.png", "weight_spectra.png"):
        assert (tmp_path / "sweep" / "figures" / name).stat().st_size > 5000
    assert not (tmp_path / "sweep" / "figures" / "time_evolution_trajectories.png").exists()  # no runs/*/ntkcv.h5


def test_cli_report_dispatches_on_sweep_json(tmp_path, capsys):
    rows = [row(train_size=30, seed=s, effective_entropy__initial=0.1 * s, trace__initial=float(s),
                train__test_accuracy__final=0.1 * s) for s in range(10)]
    _write_sweep(tmp_path / "dq", "data_quality", rows)
    assert cli(["report", str(tmp_path / "dq")]) == 0
    out = capsys.readouterr().out
    assert "data_quality: reproduced: The entropy of the NTK" in out and "findings.md" in out
    assert (tmp_path / "dq" / "figures" / "data_quality_scatter.png").is_file()
    _write_sweep(tmp_path / "other", "digits-widths", rows)
    assert cli(["report", str(tmp_path / "other")]) == 2
    assert "not one of the studies' sweeps" in capsys.readouterr().err


def test_time_evolution_cells_name_the_activation_and_outputs_where_they_vary():
    rows = []
    for activation, change in (("relu", -0.1), ("tanh", 0.1)):
        for seed, noise in enumerate((-0.004, 0.0, 0.004)):
            for widths in ((12, 12, 12), (1000, 1000, 1000)):
                r = row(widths=widths, seed=seed, effective_entropy__initial=0.5,
                        effective_entropy__final=0.5 + change + noise, trace__initial=1.0, trace__final=1.0)
                r["config.model.activation"], r["config.monitor.outputs"] = activation, "softmax"
                rows.append(r)
    findings = time_evolution.analyse(rows)
    assert sorted(c["network"] for c in findings.values["cells"]) == ["1000×3 relu", "1000×3 tanh", "12×3 relu",
                                                                       "12×3 tanh"]  # outputs do not vary
    compression = findings.claims[0]
    assert compression.verdict == "partly reproduced" and "n=30, relu: ΔS" in compression.evidence
