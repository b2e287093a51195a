"""`ntkcv train` end to end: a short run, its logs, a SIGKILL mid-run and a resume with every step once."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import time

import h5py
import matplotlib
import numpy as np
import pytest

from ntkcv._lock import LockedError
from ntkcv.config import ConfigError, load_config
from ntkcv.report import make_report, read_array, read_scalars
from ntkcv.sinks import HDF5Sink
from ntkcv.train import train

SMALL = {"data.train_size": 300, "data.probe_size": 32, "model.widths": [16], "train.batch_size": 32,
         "train.eval_every": 20, "optimizer.learning_rate": 0.01, "monitor.every_steps": 10, "output.progress": False,
         "monitor.probe_sets": ["train"]}  # one probe set: the CVs are cv/<name>
DEFAULT_MONITOR = {"monitor.probe_sets": ["train", "test"], "monitor.drift": True}  # configs/default.yaml's


def _event_steps(logdir: pathlib.Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(logdir), size_guidance={"scalars": 0})  # the whole run, as TensorBoard reads it
    accumulator.Reload()
    return [event.step for event in accumulator.Scalars(tag)]


@pytest.mark.standard_dtype_promotion
def test_short_run_writes_tensorboard_hdf5_and_report(tmp_path):
    config = load_config(None, {**SMALL, **DEFAULT_MONITOR, "train.steps": 40, "output.checkpoint_every": 15,
                                "output.dir": str(tmp_path / "run")})
    result = train(config)
    saved = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [29, 39]  # after every 15 updates (14, 29) and after the last; the two latest are kept
    assert result["final/test_accuracy"] > 0.3
    series = read_scalars(result["hdf5"])
    assert list(series["train/loss"][0]) == list(range(40))
    for probe_set in ("train", "test"):
        assert list(series[f"cv/{probe_set}/entropy"][0]) == [0, 10, 20, 30, 39]
        entropy = series[f"cv/{probe_set}/entropy"][1]
        assert np.all((entropy > 0) & (entropy < np.log(32)))
        steps, distance = series[f"cv/{probe_set}/relative_distance"]
        assert distance[0] == 0 and np.all(distance[1:] > 0)  # from the first firing's kernel
        assert series[f"cv/{probe_set}/kernel_velocity"][1][0] == 0 and list(steps) == [0, 10, 20, 30, 39]
    tensorboard = pathlib.Path(result["tensorboard"])
    assert sorted(_event_steps(tensorboard, "cv/test/entropy")) == [0, 10, 20, 30, 39]
    backend = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        summary = make_report(result["run_dir"])
        assert matplotlib.get_backend() == "svg"  # the report draws without switching the process's backend
    finally:
        matplotlib.use(backend)
    assert "cv/test/entropy" in summary.read_text()
    assert (summary.parent / "curves.png").stat().st_size > 1000
    assert (summary.parent / "spectrum.png").stat().st_size > 1000
    with pytest.raises(FileExistsError, match="--resume"):
        train(config)
    # the monitor, made (and compiling in the background) before the set-up that failed, was closed
    assert not [thread.name for thread in threading.enumerate() if thread.name.startswith("ntkcv-monitor")]


@pytest.mark.standard_dtype_promotion
def test_sigkill_then_resume_has_no_duplicate_or_missing_step(tmp_path):
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "ntkcv.cli", "train"]
    overrides = {**SMALL, **DEFAULT_MONITOR, "train.steps": 400, "output.checkpoint_every": 30,
                 "output.dir": str(run_dir)}
    for key, value in overrides.items():
        args += ["--set", f"{key}={value}"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        checkpoints = [p for p in (run_dir / "checkpoints").glob("*") if p.name.isdigit()]
        if any(int(p.name) >= 100 for p in checkpoints):
            break
        time.sleep(0.2)
    assert process.poll() is None, "the run ended before it could be killed: " + process.stderr.read().decode()[-2000:]
    process.send_signal(signal.SIGKILL)
    process.wait()
    read_scalars(run_dir / "ntkcv.h5")  # an ntkcv reader repairs the killed writer's file in place ...
    with h5py.File(run_dir / "ntkcv.h5", "r") as store:  # ... so that plain h5py opens it
        assert store["scalars/train/loss/step"].shape[0] > 0
    resumed = subprocess.run(args + ["--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    series = read_scalars(run_dir / "ntkcv.h5")
    assert list(series["train/loss"][0]) == list(range(400))
    assert list(series["cv/train/entropy"][0]) == [*range(0, 400, 10), 399]
    assert sorted(_event_steps(run_dir / "tensorboard", "train/loss")) == list(range(400))
    assert sorted(_event_steps(run_dir / "tensorboard", "cv/test/entropy")) == [*range(0, 400, 10), 399]
    saved = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [389, 399]  # the resumed run still checkpoints every 30 updates and after the last
    # drift and velocity continue as in an uninterrupted run: the monitor's state was saved with the checkpoint
    uninterrupted = read_scalars(train(load_config(None, {**overrides, "output.dir": str(tmp_path / "whole")}))["hdf5"])
    for name in ("cv/train/relative_distance", "cv/test/cosine_distance", "cv/test/kernel_velocity"):
        np.testing.assert_array_equal(series[name][0], uninterrupted[name][0])
        np.testing.assert_allclose(series[name][1], uninterrupted[name][1], rtol=1e-5, atol=1e-7)


def test_cli_reports_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  stepz: 3\n")
    done = subprocess.run([sys.executable, "-m", "ntkcv.cli", "train", str(bad)], capture_output=True, text=True)
    assert done.returncode == 2
    assert "unknown key 'train.stepz'" in done.stderr


def test_output_dir_that_is_not_writable_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    config = load_config(None, {**SMALL, "train.steps": 2, "output.dir": str(blocker / "run")})
    with pytest.raises(ValueError, match=r"output\.dir .* is not a writable directory"):
        train(config)


def test_a_rerun_loads_every_program_from_the_compilation_cache(tmp_path):
    """The second run compiles nothing (no new cache entry) and does not trace the monitor's program again (its
    stored export is read, not rewritten)."""
    cache = tmp_path / "cache"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    entries, stored = [], []
    for run in ("first", "second"):
        args = [sys.executable, "-m", "ntkcv.cli", "train"]
        for key, value in {**SMALL, "train.steps": 20, "output.dir": str(tmp_path / run),
                           "output.compilation_cache": str(cache)}.items():
            args += ["--set", f"{key}={value}"]
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        entries.append(sorted(path.name for path in cache.glob("*-cache")))
        stored.append([(path.name, path.stat().st_ino, path.stat().st_mtime_ns)
                       for path in (cache / "ntkcv-programs").iterdir()])
    programs = {name.split("-")[0] for name in entries[0]}
    assert {"jit_train_step", "jit_exported_call"} <= programs  # the train step and the monitor's (stored) program
    assert len(stored[0]) == 1 and stored[0][0][0].endswith(".jaxexport")
    assert entries[1] == entries[0]  # nothing was compiled anew
    assert stored[1] == stored[0]  # the monitor's program was loaded, not traced and stored again


@pytest.mark.standard_dtype_promotion
def test_mlflow_holds_the_steps_of_the_hdf5_store_also_after_a_resume(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    monkeypatch.chdir(tmp_path)  # MLflow's default artifact folder is ./mlruns
    run_dir, uri = tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = {**SMALL, "train.steps": 20, "output.checkpoint_every": 15, "output.dir": str(run_dir),
                 "output.sinks": ["hdf5", "mlflow"], "output.mlflow_tracking_uri": uri}
    train(load_config(None, overrides))
    first = json.loads((run_dir / "mlflow.json").read_text())
    assert not (run_dir / "tensorboard").exists()
    shutil.rmtree(run_dir / "checkpoints" / "19")  # as if killed after the checkpoint at step 14
    assert train(load_config(None, {**overrides, "train.steps": 30}), resume=True)["resumed_from"] == 15
    record = json.loads((run_dir / "mlflow.json").read_text())
    client, store = MlflowClient(uri), read_scalars(run_dir / "ntkcv.h5")
    assert list(store["cv/entropy"][0]) == [0, 10, 20, 29]  # the first session's last firing, step 19, is gone
    assert list(store["train/loss"][0]) == list(range(30))
    for name in ("train/loss", "cv/entropy", "cv/trace", "cv/relative_distance", "final/test_accuracy"):
        history = sorted((metric.step, metric.value) for metric in client.get_metric_history(record["run_id"], name))
        if name in store:
            assert [step for step, _ in history] == list(store[name][0]), name
            np.testing.assert_array_equal([value for _, value in history], store[name][1])
        else:  # hparam metrics: at the last step, once
            assert [step for step, _ in history] == [29]
    steps, spectra = read_array(run_dir / "ntkcv.h5", "cv/spectrum")
    folder = pathlib.Path(download_artifacts(run_id=record["run_id"], artifact_path="arrays/cv/spectrum",
                                             dst_path=str(tmp_path / "spectra"), tracking_uri=uri))
    logged = sorted(folder.glob("*.npy"))
    assert [int(path.stem) for path in logged] == list(steps)
    for path, spectrum in zip(logged, spectra, strict=True):
        np.testing.assert_array_equal(np.load(path), spectrum)
    run = client.get_run(record["run_id"])
    assert (run.info.status, run.data.params["train.steps"], run.data.tags["ntkcv.run_dir"]) == (
        "FINISHED", "30", str(run_dir))
    assert run.data.tags["ntkcv.resumed_from"] == first["run_id"] != record["run_id"]
    assert client.get_run(first["run_id"]).info.lifecycle_stage == "deleted"


def _logged_steps(run_dir: pathlib.Path, tag: str) -> tuple[list[int], list[int]]:
    """The steps of ``tag`` in the run's HDF5 store and (sorted) in its TensorBoard events."""
    return list(read_scalars(run_dir / "ntkcv.h5")[tag][0]), sorted(_event_steps(run_dir / "tensorboard", tag))


@pytest.mark.standard_dtype_promotion
def test_a_rerun_without_resume_is_refused_even_without_checkpoints_and_changes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    config = load_config(None, {**SMALL, "train.steps": 20, "output.dir": str(run_dir)})
    train(config)
    shutil.rmtree(run_dir / "checkpoints")  # as if killed before its first checkpoint
    saved = (run_dir / "config.json").read_bytes(), (run_dir / "config.json").stat().st_mtime_ns
    other = load_config(None, {**SMALL, "train.steps": 30, "output.dir": str(run_dir)})
    for rerun in (config, other):
        with pytest.raises(FileExistsError, match="already holds a run: pass --resume"):
            train(rerun)
        assert ((run_dir / "config.json").read_bytes(), (run_dir / "config.json").stat().st_mtime_ns) == saved
    assert train(config, resume=True)["resumed_from"] == 0  # no checkpoint: from the start, the old logs replaced
    assert _logged_steps(run_dir, "train/loss") == (list(range(20)), list(range(20)))
    assert not (run_dir / "ntkcv.lock").exists()


@pytest.mark.standard_dtype_promotion
def test_resume_keeps_the_config_and_falls_back_to_the_newest_checkpoint_that_restores(tmp_path):
    run_dir = tmp_path / "run"
    overrides = {**SMALL, "train.steps": 40, "output.checkpoint_every": 15, "output.dir": str(run_dir)}
    train(load_config(None, overrides))
    saved = (run_dir / "config.json").read_text()
    for changed, message in ((
            {"model.widths": [32], "optimizer.learning_rate": 0.1},
            r"model\.widths was \[16\], now \[32\]; optimizer\.learning_rate was 0\.01, now 0\.1\."),
            ({"train.steps": 30}, r"train\.steps was 40, now 30 \(it may only grow\)")):
        with pytest.raises(ConfigError, match=message):
            train(load_config(None, {**overrides, **changed}), resume=True)
        assert (run_dir / "config.json").read_text() == saved
    for path in (run_dir / "checkpoints" / "39").iterdir():  # the latest checkpoint is damaged
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    longer = load_config(None, {**overrides, "train.steps": 60, "output.progress": True})  # may change
    with pytest.warns(RuntimeWarning, match=r"checkpoint 39 in .*checkpoints does not restore .*: skipped"):
        result = train(longer, resume=True)
    assert result["resumed_from"] == 30
    assert _logged_steps(run_dir, "train/loss") == (list(range(60)), list(range(60)))
    assert _logged_steps(run_dir, "cv/entropy")[0] == [0, 10, 20, 30, 40, 50, 59]  # 39 was the old last step
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir()) == [44, 59]
    assert json.loads((run_dir / "config.json").read_text())["train"]["steps"] == 60


def test_a_second_writer_is_refused_while_a_run_lives_and_the_run_loses_nothing(tmp_path):
    run_dir = tmp_path / "run"
    overrides = {**SMALL, "train.steps": 3000, "train.eval_every": 500, "monitor.every_steps": 500,
                 "output.checkpoint_every": 1000, "output.dir": str(run_dir)}
    args = [sys.executable, "-m", "ntkcv.cli", "train"]
    for key, value in overrides.items():
        args += ["--set", f"{key}={value}"]
    first = subprocess.Popen(args, env={**os.environ, "JAX_PLATFORMS": "cpu"}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "ntkcv.h5").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        for resume in (False, True):
            with pytest.raises(LockedError, match=rf"output\.dir {run_dir} is in use by another run \(pid {first.pid}"):
                train(load_config(None, overrides), resume=resume)
        with pytest.raises(LockedError, match=r"ntkcv\.h5 is being written by another process"):
            HDF5Sink(run_dir / "ntkcv.h5", lock_timeout=0.1)
        assert first.poll() is None, "the run ended before a second writer came: make it longer"
        assert first.wait(timeout=300) == 0, first.stderr.read()[-3000:]
    finally:
        first.kill()
    assert _logged_steps(run_dir, "train/loss") == (list(range(3000)), list(range(3000)))


def test_a_run_killed_before_its_first_checkpoint_is_refused_without_resume_and_resumed_from_its_start(tmp_path):
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "ntkcv.cli", "train"]
    overrides = {**SMALL, "train.steps": 2000, "output.checkpoint_every": 5000, "output.dir": str(run_dir)}
    for key, value in overrides.items():
        args += ["--set", f"{key}={value}"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None and not (run_dir / "ntkcv.h5").exists():
        time.sleep(0.02)
    time.sleep(0.3)  # some steps logged; the only checkpoint is after the last step
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert not any((run_dir / "checkpoints").glob("[0-9]*"))
    rerun = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 2
    assert rerun.stderr.splitlines()[-1] == (f"ntkcv train: {run_dir} already holds a run: pass --resume to continue "
                                             "it (from its latest checkpoint, or from its start if it has none), or "
                                             "choose another output.dir")
    resumed = subprocess.run(args + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _logged_steps(run_dir, "train/loss") == (list(range(2000)), list(range(2000)))
    assert _logged_steps(run_dir, "cv/entropy") == ([*range(0, 2000, 10), 1999], [*range(0, 2000, 10), 1999])


@pytest.mark.standard_dtype_promotion
def test_train_leaves_jax_config_and_the_blas_threads_as_it_found_them(tmp_path, monkeypatch):
    import jax

    import ntkcv.train
    from ntkcv.recorder import _blas_libraries

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    before = {name: getattr(jax.config, name) for name in names}
    threads = [library["num_threads"] for library in _blas_libraries().info()]
    seen = {}
    original = ntkcv.train._train_in

    def inside(*args, **kwargs):  # what train() set while it ran
        seen.update({name: getattr(jax.config, name) for name in names})
        return original(*args, **kwargs)

    monkeypatch.setattr(ntkcv.train, "_train_in", inside)
    train(load_config(None, {**SMALL, "train.steps": 3, "output.dir": str(tmp_path / "run"),
                             "output.compilation_cache": str(tmp_path / "cache")}))
    assert seen["jax_compilation_cache_dir"] == str(tmp_path / "cache")  # on while it ran
    assert {name: getattr(jax.config, name) for name in names} == before
    assert [library["num_threads"] for library in _blas_libraries().info()] == threads
