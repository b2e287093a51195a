"""`ntkcv train` on a full disk: a clear error instead of a hang; once the disk has grown, `--resume` completes the
run with every step once. Mounts a 1.2 MB tmpfs, so it needs root on Linux; skipped elsewhere."""

import os
import subprocess
import sys

import pytest

from ntkcv.report import read_scalars
from tests.conftest import tmpfs
from tests.test_train import SMALL, _event_steps

STEPS = 5000  # the disk fills after about half of them


@pytest.fixture
def small_disk(tmp_path):
    """A directory on a tmpfs of 1.2 MB, unmounted after the test."""
    with tmpfs(tmp_path / "disk", "1200k") as disk:
        yield disk


def _train(run_dir, *args: str, timeout: float) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "ntkcv.cli", "train", *args]
    for key, value in {**SMALL, "train.steps": STEPS, "output.checkpoint_every": 100,
                       "output.dir": str(run_dir)}.items():
        command += ["--set", f"{key}={value}"]
    return subprocess.run(command, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
                          timeout=timeout)


def test_a_full_disk_ends_the_run_with_an_error_and_resume_completes_it(small_disk):
    run_dir = small_disk / "run"
    try:
        failed = _train(run_dir, timeout=180)
    except subprocess.TimeoutExpired:
        pytest.fail("ntkcv train hung on a full disk")
    assert failed.returncode != 0
    assert "No space left on device" in failed.stderr, failed.stderr[-3000:]

    subprocess.run(["mount", "-o", "remount,size=50m", str(small_disk)], check=True)
    resumed = _train(run_dir, "--resume", timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    series = read_scalars(run_dir / "ntkcv.h5")
    assert list(series["train/loss"][0]) == list(range(STEPS))
    assert list(series["cv/entropy"][0]) == [*range(0, STEPS, 10), STEPS - 1]
    assert sorted(_event_steps(run_dir / "tensorboard", "train/loss")) == list(range(STEPS))
    assert sorted(_event_steps(run_dir / "tensorboard", "cv/entropy")) == [*range(0, STEPS, 10), STEPS - 1]
