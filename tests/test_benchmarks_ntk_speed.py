"""``benchmarks.ntk_speed`` on the realistic models (ResNet-18, ViT-tiny) shrunk, so the benchmark cannot rot: each
implementation's kernel against the others' and, where its environment exists, neural-tangents'."""

import json
import pathlib
import subprocess
import sys

import pytest

import ntkcv
from benchmarks.ntk_speed import TINY_SPECS, _parse, _skip_reason, timeouts
from benchmarks.reference_models import peer_available

ROOT = pathlib.Path(__file__).resolve().parents[1]
IMPLEMENTATIONS = {i.value for i in ntkcv.Implementation} - {"auto"}


def run_benchmark(tmp_path, *args: str) -> dict:
    output = tmp_path / "result.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.ntk_speed", "--tiny", "--ns", "4", "--modes", "traced",
                           "--reps", "1", "--output", str(output), *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(output.read_text())
    for row in result["rows"]:  # the printed table
        assert f"| {row['model']} | traced | 4 |" in done.stdout
    return result


def test_realistic_models_run_and_agree(tmp_path):
    result = run_benchmark(tmp_path, "--models", "resnet18,vit_tiny", "--implementations", "jacobian,structured",
                           "--no-peer")
    assert {"cpu", "cores", "jax", "load_average_at_start", "memory_limit_gb"} <= set(result["machine"])
    assert [(row["model"], row["spec"]) for row in result["rows"]] == list(TINY_SPECS.items())
    for row in result["rows"]:
        assert row["nt"] == {} and row["reference"] == "ntkcv jacobian"
        assert row["auto_picks"] in IMPLEMENTATIONS
        assert set(row["estimated_flops"]) == IMPLEMENTATIONS and min(row["estimated_flops"].values()) > 0
        for run in row["ntkcv"].values():
            assert run["status"] == "ok" and run["seconds"] > 0 and run["peak_rss_mb"] > 0
        # two float32 computations of one kernel (BatchNorm's statistics held fixed, not differentiated)
        assert row["ntkcv"]["structured"]["rel_diff"] < 1e-5


def test_runs_after_a_failure_are_skipped():
    failures = [(64, "traced", "timeout")]
    assert _skip_reason(failures, 32, "full", 1.0, None) is None
    assert _skip_reason(failures, 64, "full", 1.0, None) == "skipped (timeout at N = 64, traced)"
    assert _skip_reason(failures, 256, "traced", 1.0, None) == "skipped (timeout at N = 64, traced)"
    full_failed = [(64, "full", "out of memory")]
    assert _skip_reason(full_failed, 256, "traced", 1.0, None) is None
    assert _skip_reason(full_failed, 256, "full", 1.0, None) == "skipped (out of memory at N = 64, full)"
    assert _skip_reason([], 256, "full", 2e12, 1e12) == "skipped (estimate over 1e+12 FLOPs)"
    assert _skip_reason([], 256, "full", 2e12, 1e13) is None


def test_child_failures_are_told_apart():
    def parse(returncode: int, stderr: str = "", stdout: str = "") -> dict:
        return _parse(subprocess.CompletedProcess([], returncode, stdout, stderr), 14.0)

    assert parse(0, stdout='log\n{"seconds": 1.5}\n') == {"status": "ok", "seconds": 1.5}
    oom = "jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED: Out of memory allocating 8000000000 bytes."
    assert parse(1, oom) == {"status": "out of memory", "memory_limit_gb": 14.0}
    assert parse(-9)["status"] == "out of memory"  # the kernel's OOM killer
    assert parse(-4, "could not append a binary post-op") == {
        "status": "failed", "error": ["could not append a binary post-op", "killed by SIGILL"]}
    assert parse(0, stdout="no result")["status"] == "failed"


def test_timeouts_for_every_n_or_each():
    assert timeouts("300", [64, 256]) == {64: 300.0, 256: 300.0}
    assert timeouts("64=120,256=600", [64, 256]) == {64: 120.0, 256: 600.0}
    with pytest.raises(ValueError, match=r"N = \[256\]"):
        timeouts("64=120", [64, 256])


@pytest.mark.peer
@pytest.mark.skipif(not peer_available(), reason="peer environment absent")
def test_peer_runner_agrees_on_a_batchnorm_resnet(tmp_path):
    """neural-tangents differentiates ``params`` only, as ntkcv does; its kernel, averaged over the traced outputs,
    times 10 is ours."""
    result = run_benchmark(tmp_path, "--models", "resnet18", "--implementations", "structured",
                           "--peer-implementations", "3")
    (row,) = result["rows"]
    assert row["nt"]["3"]["status"] == "ok" and row["nt"]["3"]["peak_rss_mb"] > 0
    assert row["reference"] == "nt 3" and row["ratio"] > 0
    assert row["ntkcv"]["structured"]["rel_diff"] < 1e-5
