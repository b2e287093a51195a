"""`ntkcv sweep`: grid expansion, the results table against the HDF5 logs, skipping done runs, a SIGKILL
mid-sweep and a rerun with every run once, divergence and failure, and the Ray executor against the local one."""

import math
import os
import pathlib
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import yaml

from ntkcv.cli import main
from ntkcv.config import ConfigError
from ntkcv.sweep import expand, load_sweep, read_table, run_sweep, summarise_run
from ntkcv.sweep._runner import _worker_count
from ntkcv.sweep._table import write_table

ROOT = pathlib.Path(__file__).resolve().parents[1]

TINY = {"data": {"train_size": 200, "probe_size": 16}, "model": {"widths": [8]},
        "train": {"steps": 30, "batch_size": 32, "eval_every": 10},
        "monitor": {"every_steps": 10, "probe_sets": ["train"]},
        "output": {"tensorboard": False, "checkpoint_every": 10}}


def _sweep(grid, **keys):
    return load_sweep({"name": "tiny", "base": TINY, "grid": grid, **keys})


def _scalar(store: pathlib.Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    with h5py.File(store, "r") as file:
        return file[f"scalars/{name}/step"][()], file[f"scalars/{name}/value"][()]


def _key(run):
    return run.config.model.widths, run.config.train.seed, run.config.optimizer.name, run.config.optimizer.learning_rate


def test_expand_is_the_product_and_run_ids_are_stable():
    grid = {"model.widths": [[8], [16]], "train.seed": [0, 1, 2]}
    runs = [{}, {"optimizer.name": "sgd", "optimizer.learning_rate": 1}]
    expanded = expand(_sweep(grid, runs=runs))
    assert len(expanded) == 2 * 3 * 2 == len({run.run_id for run in expanded})
    ids = {_key(run): run.run_id for run in expanded}
    assert expanded[-1].overrides == {"model.widths": [16], "train.seed": 2, "optimizer.name": "sgd",
                                      "optimizer.learning_rate": 1}
    assert expanded[-1].config.model.widths == (16,) and expanded[-1].config.optimizer.learning_rate == 1.0
    assert not expanded[0].config.output.progress

    reordered = {"train.seed": [2, 7, 0, 1], "model.widths": [[16], [8]]}  # keys and values reordered, a value added
    again = expand(_sweep(reordered, runs=[{"optimizer.learning_rate": 1.0, "optimizer.name": "sgd"}, {}]))
    again_ids = {_key(run): run.run_id for run in again}
    assert len(again) == 16
    assert all(again_ids[key] == run_id for key, run_id in ids.items())  # 1 and 1.0 are the same learning rate
    label, digest = expanded[0].run_id.rsplit("-", 1)
    assert label == "widths=8-seed=0" and len(digest) == 8 and int(digest, 16) >= 0


@pytest.mark.parametrize(("sweep", "message"), [
    ({"name": "s", "grids": {}}, "unknown key 'grids'"),
    ({"grid": {}}, "name must be"),
    ({"name": "s", "base": {"train": {"stepz": 3}}}, "base: unknown key 'train.stepz'"),
    ({"name": "s", "grid": {"train.stepz": [1]}}, "grid['train.stepz'][0]: unknown key 'train.stepz'"),
    ({"name": "s", "grid": {"train.steps": [10, 0]}}, "grid['train.steps'][1]: train.steps must be at least 1"),
    ({"name": "s", "grid": {"model.widths": [[8], ["x"]]}}, "grid['model.widths'][1]: model.widths[0] must be an int"),
    ({"name": "s", "grid": {"train.seed": 3}}, "grid['train.seed'] must be a non-empty list"),
    ({"name": "s", "grid": {"train.seed": [0]}, "runs": [{"train.seed": 1}]}, "runs[0] sets 'train.seed'"),
    ({"name": "s", "runs": [{"optimizer.name": "lbfgs"}]}, "runs[0]: optimizer.name must be one of"),
    ({"name": "s", "grid": {"train.seed": [0, 0]}}, "two runs have the same overrides"),
    ({"name": "s", "base": {"output": {"hdf5": False}}}, "output.hdf5 must stay true"),
    ({"name": "s", "workers": 0}, "workers must be an integer >= 1"),
])
def test_invalid_sweeps_name_the_key(sweep, message):
    with pytest.raises(ConfigError) as error:
        load_sweep(sweep)
    assert message in str(error.value)


def test_yaml_base_config_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"train": {"steps": 99, "seed": 5}, "model": {"widths": [4]}}))
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(
        {"name": "y", "base_config": "base.yaml", "base": {"train": {"steps": 11}}, "grid": {"train.seed": [0, 1]}}))
    sweep = load_sweep(tmp_path / "sweep.yaml", {"workers": 3, "base.data.probe_size": 8, "grid.model.activation":
                                                 ["relu"]})
    assert sweep.workers == 3 and sweep.grid == {"train.seed": (0, 1), "model.activation": ("relu",)}
    config = expand(sweep)[1].config
    assert (config.train.steps, config.train.seed, config.model.widths) == (11, 1, (4,))
    assert (config.data.probe_size, config.model.activation) == (8, "relu")
    with pytest.raises(ConfigError, match="does not exist"):
        load_sweep({"name": "y", "base_config": str(tmp_path / "missing.yaml")})


def test_worker_count_is_bounded_by_cpus_and_memory():
    assert _worker_count(4, 1.0, cpus=2, available_gb=10.0) == 2
    assert _worker_count(4, 3.0, cpus=8, available_gb=7.5) == 2
    assert _worker_count(4, 8.0, cpus=8, available_gb=1.0) == 1
    assert _worker_count(3, 1.0, cpus=8, available_gb=64.0) == 3


def test_table_round_trips_cells(tmp_path):
    rows = [{"run_id": "a-0123abcd", "status": "complete", "error": None, "config.model.widths": "[8, 8]",
             "x.final": 0.1 + 0.2, "x.min": math.nan, "x.argmin_step": None, "flag": True, "n": 7, "s": "1_000"},
            {"run_id": "b-0123abcd", "status": "failed", "error": 'ValueError: "bad",\nvalue', "seconds": 1e-9}]
    write_table(tmp_path / "t.csv", rows)
    back = read_table(tmp_path / "t.csv")
    assert back[0]["x.final"] == 0.1 + 0.2 and math.isnan(back[0]["x.min"]) and back[0]["x.argmin_step"] is None
    assert (back[0]["flag"], back[0]["n"], back[0]["s"], back[0]["config.model.widths"]) == (True, 7, "1_000", "[8, 8]")
    assert back[1]["error"] == 'ValueError: "bad",\nvalue' and back[1]["seconds"] == 1e-9 and back[1]["n"] is None
    assert list(back[0]) == ["run_id", "status", "error", "config.model.widths", "flag", "n", "s", "x.argmin_step",
                             "x.final", "x.min", "seconds"]


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory):
    """Two seeds run by the local executor in two spawned worker processes."""
    sweep = _sweep({"train.seed": [0, 1]})
    folder = tmp_path_factory.mktemp("local")
    return sweep, folder, run_sweep(sweep, folder, workers=2, progress=False)


def test_table_summarises_each_runs_hdf5(local_sweep):
    sweep, folder, table = local_sweep
    rows = read_table(table)
    assert [row["run_id"] for row in rows] == [run.run_id for run in expand(sweep)]
    for row, seed in zip(rows, [0, 1], strict=True):
        assert (row["status"], row["error"], row["config.train.seed"], row["config.model.widths"]) == (
            "complete", None, seed, "[8]")
        store = folder / "runs" / row["run_id"] / "ntkcv.h5"
        steps, entropy = _scalar(store, "cv/entropy")
        assert list(steps) == [0, 10, 20, 29]
        assert row["entropy.initial"] == entropy[0] and row["entropy.final"] == entropy[-1]
        assert row["entropy.min"] == entropy.min() and row["entropy.max"] == entropy.max()
        assert row["entropy.argmin_step"] == steps[np.argmin(entropy)]
        assert row["entropy.argmax_step"] == steps[np.argmax(entropy)]
        assert row["train.test_accuracy.final"] == _scalar(store, "train/test_accuracy")[1][-1]
        assert row["train.loss.final"] == _scalar(store, "train/loss")[1][-1] and row["seconds"] > 0
        assert row == {key: value for key, value in summarise_run(store.parent).items() if key in row}
    assert rows[0]["entropy.final"] != rows[1]["entropy.final"]  # the seeds differ


def test_rerun_skips_done_runs(local_sweep):
    sweep, folder, table = local_sweep
    results = sorted((folder / "runs").glob("*/result.json"))
    stamps = [path.stat().st_mtime_ns for path in results]
    before = table.read_bytes()
    assert run_sweep(sweep, folder, progress=False) == table
    assert [path.stat().st_mtime_ns for path in results] == stamps
    assert table.read_bytes() == before
    edited = _sweep({"train.seed": [0, 1]}, base={**TINY, "train": {**TINY["train"], "steps": 31}})
    with pytest.raises(ValueError, match=r"another config \(train.steps was 30, now 31\)"):
        run_sweep(edited, folder, progress=False)


def test_rerun_over_a_truncated_store_is_a_clear_error_not_a_hang(tmp_path):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump({"name": "tiny", "base": TINY, "grid": {"train.seed": [0]}}))
    command = [sys.executable, "-m", "ntkcv.cli", "sweep", str(spec), "--dir", str(tmp_path / "sweep")]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    assert subprocess.run(command, capture_output=True, timeout=300, env=env).returncode == 0
    store = next((tmp_path / "sweep" / "runs").glob("*/ntkcv.h5"))
    store.write_bytes(store.read_bytes()[: store.stat().st_size // 2])
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode != 0
    assert f"cannot read the HDF5 store {store}" in done.stderr and "truncated file" in done.stderr


def test_ray_executor_gives_the_local_table(local_sweep, tmp_path):
    ray = pytest.importorskip("ray")  # in the test extra, so CI runs this
    sweep, _, local_table = local_sweep
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ray_table = run_sweep(sweep, tmp_path / "ray", executor="ray", progress=False)
    finally:
        ray.shutdown()
    local, remote = read_table(local_table), read_table(ray_table)
    assert [row["run_id"] for row in remote] == [row["run_id"] for row in local]
    assert [row["status"] for row in remote] == ["complete", "complete"]
    for a, b in zip(local, remote, strict=True):
        assert a.keys() == b.keys()
        for key in a.keys() - {"seconds", "config.output.dir"}:
            if isinstance(a[key], float):
                assert b[key] == pytest.approx(a[key], rel=1e-5, nan_ok=True), key
            else:
                assert b[key] == a[key], key


def test_ray_executor_without_ray_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(ImportError, match=r'pip install "ntkcv\[ray\]"'):
        run_sweep(_sweep({"train.seed": [0]}), tmp_path / "sweep", executor="ray", progress=False)
    assert not (tmp_path / "sweep").exists()


@pytest.mark.filterwarnings("ignore:.*non-finite:RuntimeWarning")  # the NTK of the diverged run
def test_diverged_and_failed_runs_stay_in_the_table(tmp_path):
    base = {**TINY, "train": {**TINY["train"], "steps": 12, "loss": "mse"}, "optimizer": {"name": "sgd"}}
    runs = [{"optimizer.learning_rate": 1e6}, {"data.name": "mnist", "data.path": str(tmp_path / "nowhere")}]
    sweep = load_sweep({"name": "bad", "base": base, "runs": runs})
    table = run_sweep(sweep, tmp_path / "sweep", workers=1, progress=False)
    diverged, failed = read_table(table)
    assert diverged["status"] == "diverged" and math.isnan(diverged["train.loss.final"])
    assert failed["status"] == "failed" and "FileNotFoundError" in failed["error"] and "nowhere" in failed["error"]
    diverged_result = tmp_path / "sweep" / "runs" / diverged["run_id"] / "result.json"
    failed_result = tmp_path / "sweep" / "runs" / failed["run_id"] / "result.json"
    stamps = diverged_result.stat().st_mtime_ns, failed_result.stat().st_mtime_ns
    run_sweep(sweep, tmp_path / "sweep", workers=1, progress=False)  # a failed run is tried again
    assert diverged_result.stat().st_mtime_ns == stamps[0] and failed_result.stat().st_mtime_ns != stamps[1]
    assert [row["run_id"] for row in read_table(table)] == [diverged["run_id"], failed["run_id"]]


@pytest.mark.standard_dtype_promotion
def test_sigkill_midway_then_rerun_has_every_run_once(tmp_path, capsys):
    spec = {"name": "killed", "base": {**TINY, "train": {**TINY["train"], "steps": 40}},
            "grid": {"train.seed": [0, 1, 2]}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(spec))
    folder = tmp_path / "sweep"
    args = ["sweep", str(tmp_path / "sweep.yaml"), "--workers", "1", "--dir", str(folder)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    process = subprocess.Popen([sys.executable, "-m", "ntkcv.cli", *args], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    run_ids = [run.run_id for run in expand(load_sweep(tmp_path / "sweep.yaml"))]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        done = [run_id for run_id in run_ids if (folder / "runs" / run_id / "result.json").exists()]
        started = [run_id for run_id in run_ids if run_id not in done and
                   any(p.name.isdigit() for p in (folder / "runs" / run_id / "checkpoints").glob("*"))]
        if done and started:  # one run done, the next one part-way with a checkpoint
            break
        time.sleep(0.05)
    assert process.poll() is None, "the sweep ended before it could be killed: " + process.stderr.read().decode()
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert 1 <= len(read_table(folder / "results.csv")) < 3  # the partial table is valid

    assert main(args) == 0
    assert f"results: {folder / 'results.csv'}  (3 complete)" in capsys.readouterr().out
    rows = read_table(folder / "results.csv")
    assert sorted(row["run_id"] for row in rows) == sorted(run_ids)
    assert [row["status"] for row in rows] == ["complete"] * 3
    for run_id in run_ids:
        store = folder / "runs" / run_id / "ntkcv.h5"
        assert list(_scalar(store, "train/loss")[0]) == list(range(40))
        assert list(_scalar(store, "cv/entropy")[0]) == [0, 10, 20, 30, 39]


def test_cli_rejects_an_unknown_key_with_exit_code_2(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("name: bad\ngrid:\n  train.stepz: [1]\n")
    assert main(["sweep", str(tmp_path / "bad.yaml")]) == 2
    assert "unknown key 'train.stepz'" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_sweep_configs_expand(path):
    assert expand(load_sweep(path))
