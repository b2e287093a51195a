"""``benchmarks/gpu.sh --smoke``: every GPU row at tiny sizes on this machine, so the script cannot rot."""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

import ntkcv

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.sh"
IMPLEMENTATIONS = {i.value for i in ntkcv.Implementation} - {"auto"}


def run_script(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHON": sys.executable, **env})


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("gpu-smoke")
    done = run_script("--smoke", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    return {path.name: json.loads(path.read_text()) for path in out.glob("*.json")}


def test_every_row_writes_its_json_with_the_machine(smoke):
    assert sorted(smoke) == ["cv_scale-full-16-smoke.json", "monitor_overhead-smoke.json",
                             "ntk_speed-mlp-32-smoke.json", "ntk_speed-resnet18-8-smoke.json"]
    for result in smoke.values():
        assert {"platform", "device", "jax"} <= set(result["machine"])


@pytest.mark.parametrize(("name", "precisions"), [("ntk_speed-mlp-32-smoke.json", {"highest", "tensorfloat32"}),
                                                  ("ntk_speed-resnet18-8-smoke.json", {"highest"})])
def test_ntk_rows_time_each_precision_against_float64(smoke, name, precisions):
    (row,) = smoke[name]["rows"]
    assert row["mode"] == "traced" and row["implementation"] == "auto"
    assert set(row["precisions"]) == precisions
    assert row["reference"]["block"] > 0
    for result in row["precisions"].values():
        assert result["implementation"] in IMPLEMENTATIONS  # what "auto" picked
        assert result["seconds"] > 0
        # float32 on the CPU against the float64 jacobian reference: rounding only
        assert result["max_rel_error_vs_float64"] < 1e-4


def test_resnet_row_is_the_shrunk_resnet18(smoke):
    (row,) = smoke["ntk_speed-resnet18-8-smoke.json"]["rows"]
    assert row["spec"] == {"kind": "resnet18", "widths": [4, 4, 4, 4], "classes": 10} and row["n"] == 8


def test_matrix_free_entropy_row(smoke):
    (row,) = smoke["cv_scale-full-16-smoke.json"]["rows"]
    assert row["kernel"] == "full" and row["dim"] == 160 and "error" in row["exact"]  # no dense eigvalsh
    free = row["matrix_free"]
    assert 0 < free["entropy"] <= math.log(row["dim"]) + 3 * free["entropy_stderr"]
    assert 0 <= free["entropy_stderr"] < 0.5 and free["trace"] > 0


def test_monitor_overhead_row(smoke):
    result = smoke["monitor_overhead-smoke.json"]
    assert result["steps"] == 60 and set(result["runs"]) == {"cold"}
    assert {mode: len(runs) for mode, runs in result["runs"]["cold"].items()} == {"off": 1, "on": 1}
    assert math.isfinite(result["overhead"]["cold"]["on"])
    assert result["runs"]["cold"]["on"][0]["test_accuracy"] > 0.5


def test_rows_are_skipped_once_the_budget_is_spent(tmp_path):
    done = run_script("--smoke", str(tmp_path), BUDGET_SECONDS="0")
    assert done.returncode == 1
    assert done.stderr.count(": skipped, ") == 4 and not list(tmp_path.iterdir())


def test_unknown_argument_is_refused():
    done = run_script("--fast")
    assert done.returncode == 2 and "--fast" in done.stderr
