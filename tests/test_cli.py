"""``ntkcv`` on the command line: an expected error is one line on stderr and exit status 2, with nothing made
on disk for a bad config; a bug keeps its traceback and asks to be reported."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import yaml

from ntkcv import __version__, cli
from ntkcv._lock import LockedError
from ntkcv.config import ConfigError
from ntkcv.report import read_scalars
from tests.conftest import tmpfs


def _one_line(capsys, command: str) -> str:
    """The single line ``ntkcv COMMAND: ...`` that was printed on stderr."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ntkcv {command}: "), err
    return lines[0]


@pytest.mark.parametrize("args, message", [
    (["--set", "model.widths=[8,0]"], "model.widths[1] must be at least 1, got 0"),
    (["--set", "model.kind=transformer", "--set", "model.heads=3"], "model.heads must divide model.dim (64), got 3"),
    (["--set", "data.indices=[0,1437]"], "data.indices must be rows of the training split, in [0, 1437); got 1437"),
    (["--set", "data.train_size=5000"], "data.train_size must be at most 1437 (the examples available), got 5000"),
    (["--set", "data.test_size=0"], "data.test_size must be a positive integer or None, got 0"),
    (["--set", "data.name=mnist"], "data.path is required for data set 'mnist'"),
    (["--set", "data.probe_size=2000"], "data.probe_size must be at most 1437 (the training examples)"),
    (["--set", "monitor.matrix_free=true"], "with monitor.matrix_free true"),
    (["--set", "monitor.log_spaced=-1"], "monitor.log_spaced must be at least 0, got -1"),
    (["--set", "monitor.trace_axes=[2]"], "monitor.trace_axes must be [], [1] or [-1]"),
    (["--set", "data.name=synthetic"], "train.loss must be 'mse' for data set 'synthetic', a regression task"),
    (["--set", "data.name=synthetic", "--set", "train.loss=mse", "--set", "monitor.cvs=[class_entropy]"],
     "monitor.cvs[0] 'class_entropy' needs class labels, and data set 'synthetic' is a regression task"),
    (["--set", "output.dir=TMP/run-{seed}"], "output.dir may hold only the field {time} (the start time)"),
    (["--set", "output.dir=TMP/run-{time"], "output.dir 'TMP/run-{time' is not a valid template"),
    (["--set", "optimizer.learning_rate=1e-3", "--set", "train.steps=0"], "train.steps must be at least 1, got 0"),
    (["--set", "train.steps"], "--set expects KEY=VALUE (e.g. train.steps=200), got 'train.steps'"),
    (["--set", "train.steps=[1"], "--set train.steps is not valid YAML: while parsing a flow sequence: expected ',' "
                                  "or ']', but got '<stream end>' at line 1, column 3"),
    (["TMP/bad.yaml"], "config file 'TMP/bad.yaml' is not valid YAML: mapping values are not allowed here at line 1"),
    (["TMP/missing.yaml"], "config file 'TMP/missing.yaml' does not exist"),
    (["--resume", "--set", "output.dir=TMP/run-{time}"], "--resume needs the run's own directory"),
])
def test_config_errors_are_one_line_and_create_nothing(tmp_path, capsys, args, message):
    (tmp_path / "bad.yaml").write_text("train: steps: 3\n")
    args = [arg.replace("TMP", str(tmp_path)) for arg in args]
    assert cli.main(["train", "--set", f"output.dir={tmp_path}/run", *args]) == 2
    assert message.replace("TMP", str(tmp_path)) in _one_line(capsys, "train")
    assert not list(tmp_path.glob("run*"))


def test_config_warnings_are_lines_before_the_error(tmp_path, capsys):
    args = ["train", "--resume", "--set", "train.batch_size=5000", "--set", f"output.dir={tmp_path}/run-{{time}}"]
    assert cli.main(args) == 2
    warning, error = capsys.readouterr().err.splitlines()
    assert warning == ("ntkcv train: warning: train.batch_size 5000 is larger than the 1437 training examples: "
                       "every step trains on all 1437")
    assert error.startswith("ntkcv train: --resume needs the run's own directory")


def _yaml_error():
    try:
        yaml.safe_load("a: [1")
    except yaml.YAMLError as error:
        return error


@pytest.mark.parametrize("error, message", [
    (FileExistsError("runs/x already holds a run: pass --resume"), "runs/x already holds a run: pass --resume"),
    (LockedError("output.dir runs/x is in use by another run (pid 123)", "pid 123"),
     "output.dir runs/x is in use by another run (pid 123)"),
    (PermissionError(13, "Permission denied", "runs/x"), "[Errno 13] Permission denied: 'runs/x'"),
    (ConfigError("the config differs:\n  train.steps was 30, now 31"),
     "the config differs: train.steps was 30, now 31"),
    (_yaml_error(), "while parsing a flow sequence: expected ',' or ']', but got '<stream end>' at line 1, column 6"),
    (ImportError('the Ray executor needs ray: pip install "ntkcv[ray]"'),
     'the Ray executor needs ray: pip install "ntkcv[ray]"'),
])
def test_every_expected_error_is_one_line_with_status_2(monkeypatch, capsys, error, message):
    def fail(args):
        raise error

    monkeypatch.setattr(cli, "_report", fail)
    assert cli.main(["report", "somewhere"]) == 2
    assert _one_line(capsys, "report") == f"ntkcv report: {message}"


def test_ctrl_c_is_one_line_with_status_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_report", interrupted)
    assert cli.main(["report", "somewhere"]) == 130
    assert _one_line(capsys, "report") == "ntkcv report: interrupted"


def test_a_bug_keeps_its_traceback_and_asks_to_be_reported(monkeypatch, capsys):
    def buggy(args):
        raise TypeError("unsupported operand")

    monkeypatch.setattr(cli, "_report", buggy)
    assert cli.main(["report", "somewhere"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and "TypeError: unsupported operand" in err
    assert err.splitlines()[-1] == (f"ntkcv report: this is a bug in ntkcv {__version__}; please report it with the "
                                    "traceback above")


def test_file_system_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "ntkcv.h5").write_bytes(b"not HDF5")
    (tmp_path / "a-file").write_text("")
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({"name": "s", "base": {"train": {"steps": 2}},
                                                        "grid": {"train.seed": [0]}}))
    for run_dir, message in (("nowhere", "has no ntkcv.h5"), ("empty", "has no ntkcv.h5"), ("corrupt", "")):
        assert cli.main(["report", str(tmp_path / run_dir)]) == 2
        assert message in _one_line(capsys, "report")
    train = ["train", "--set", f"output.dir={tmp_path}/a-file/run", "--set", "output.compilation_cache='off'"]
    assert cli.main(train) == 2
    assert "is not a writable directory" in _one_line(capsys, "train")
    assert cli.main(["sweep", str(tmp_path / "sweep.yaml"), "--dir", str(tmp_path / "a-file")]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("ntkcv sweep: [Errno 20] Not a directory")


@pytest.mark.parametrize("launcher", ["module", "script"])
def test_both_launchers_exit_with_mains_status(tmp_path, launcher):
    """``python -m ntkcv.cli`` and the ``ntkcv`` script, a real process each: one line, status 2, nothing made."""
    command = [sys.executable, "-m", "ntkcv.cli"]
    if launcher == "script":
        script = pathlib.Path(sys.executable).parent / "ntkcv"
        if not script.is_file():
            pytest.skip("the ntkcv script is not installed beside this python")
        command = [str(script)]
    run_dir = tmp_path / "run"
    done = subprocess.run([*command, "train", "--set", "model.widths=[0]", "--set", f"output.dir={run_dir}"],
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.splitlines() == ["ntkcv train: model.widths[0] must be at least 1, got 0"]
    assert not run_dir.exists()


@pytest.mark.standard_dtype_promotion
def test_regression_runs_record_the_target_alignments(tmp_path, capsys):
    """Kernel-target alignment is defined for real targets: a regression run records it (with the output axis
    kept) instead of dropping it."""
    overrides = {"data.name": "synthetic", "train.loss": "mse", "data.train_size": 64, "data.probe_size": 16,
                 "model.widths": [8], "train.steps": 2, "train.batch_size": 16, "monitor.every_steps": 1,
                 "monitor.cvs": "[target_alignment, centred_target_alignment]", "monitor.trace_axes": "[]",
                 "monitor.probe_sets": "[train]", "monitor.drift": "false",
                 "output.dir": tmp_path / "run", "output.tensorboard": "false", "output.progress": "false",
                 "output.compilation_cache": "'off'"}
    assert cli.main(["train", *[arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]]) == 0
    assert "Traceback" not in capsys.readouterr().err
    series = read_scalars(tmp_path / "run" / "ntkcv.h5")
    for name in ("cv/target_alignment", "cv/centred_target_alignment"):
        steps, values = series[name]
        assert list(steps) == [0, 1] and np.all(np.isfinite(values)) and np.all(np.abs(values) <= 1)


@pytest.fixture
def read_only_disk(tmp_path):
    """A tmpfs holding ``killed/ntkcv.h5`` (its writer killed mid-run), remounted read-only; root on Linux only."""
    with tmpfs(tmp_path / "disk", "4m") as disk:
        (disk / "killed").mkdir()
        script = ("import os, sys; from ntkcv.sinks import HDF5Sink\n"
                  "sink = HDF5Sink(sys.argv[1])\n"
                  "for step in range(5): sink.write_scalars(step, {'train/loss': float(step)})\n"
                  "sink.flush(); os.kill(os.getpid(), 9)\n")
        subprocess.run([sys.executable, "-c", script, str(disk / "killed" / "ntkcv.h5")], check=False)
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        yield disk


def test_a_read_only_disk_is_one_line_for_train_and_readable_for_report(read_only_disk, capsys):
    train = ["train", "--set", f"output.dir={read_only_disk}/run", "--set", "output.compilation_cache='off'"]
    assert cli.main(train) == 2
    line = _one_line(capsys, "train")
    assert "is not a writable directory" in line and "Read-only file system" in line
    steps, values = read_scalars(read_only_disk / "killed" / "ntkcv.h5")["train/loss"]  # as it is: no repair
    assert list(steps) == list(range(5)) and list(values) == [0.0, 1.0, 2.0, 3.0, 4.0]
