import datetime
import json
import pathlib
import subprocess
import sys

import h5py
import numpy as np
import pytest

import ntkcv
from ntkcv._lock import LockedError
from ntkcv.report import read_scalars
from ntkcv.sinks import HDF5Sink
from ntkcv.sinks._superblock import lookup3

READER = """
import json, sys, h5py
with h5py.File(sys.argv[1], "r", libver="latest", swmr=True) as f:
    loss = f["scalars/train/loss"]
    for _ in range(2):
        loss["step"].refresh(); loss["value"].refresh()
        print(json.dumps([loss["step"][:].tolist(), loss["value"][:].tolist()]), flush=True)
        sys.stdin.readline()
"""


def test_scalars_and_arrays_round_trip(tmp_path):
    path = tmp_path / "run.h5"
    with HDF5Sink(path) as sink:
        for step in range(10):
            sink.write_scalars(step, {"train/loss": 1 / (step + 1)})
        sink.write_scalars(0, {"cv/entropy": 0.5})
        sink.write_scalars(5, {"cv/entropy": np.float32(0.25)})
        sink.write_arrays(0, {"cv/spectrum": np.array([3.0, 2.0, 1.0]), "kernel": np.eye(2, dtype=np.float32)})
        sink.write_arrays(5, {"cv/spectrum": np.arange(5, dtype=np.int32), "kernel": np.ones((3, 3))})
    with h5py.File(path, "r") as f:
        loss = f["scalars/train/loss"]
        np.testing.assert_array_equal(loss["step"][:], np.arange(10))
        np.testing.assert_allclose(loss["value"][:], 1 / (np.arange(10) + 1))
        np.testing.assert_array_equal(f["scalars/cv/entropy/step"][:], [0, 5])
        np.testing.assert_array_equal(f["scalars/cv/entropy/value"][:], [0.5, 0.25])
        spectrum = f["arrays/cv/spectrum"]
        np.testing.assert_array_equal(spectrum["step"][:], [0, 5])
        np.testing.assert_array_equal(spectrum["value"][:], [[3, 2, 1, np.nan, np.nan], [0, 1, 2, 3, 4]])
        np.testing.assert_array_equal(spectrum["shape"][:], [[3], [5]])
        kernel = f["arrays/kernel"]
        assert kernel["value"].dtype == np.float32 and kernel["value"].shape == (2, 3, 3)
        np.testing.assert_array_equal(kernel["value"][0, :2, :2], np.eye(2))
        assert np.isnan(kernel["value"][0, 2]).all() and np.isnan(kernel["value"][0, :, 2]).all()
        np.testing.assert_array_equal(kernel["shape"][:], [[2, 2], [3, 3]])
        for dataset in (loss["step"], loss["value"], spectrum["value"], kernel["value"]):
            assert dataset.maxshape == (None,) * dataset.ndim and dataset.chunks is not None


def test_metadata_attributes(tmp_path):
    path = tmp_path / "run.h5"
    with HDF5Sink(path) as sink:
        sink.write_hparams({"lr": 0.1, "width": np.int64(64), "optimizer": "adam", "layers": [2, 3], "seed": None,
                            "extra": {"a": 1}}, {"final/loss": 0.25})
        sink.write_scalars(0, {"train/loss": 1.0})
        sink.write_scalars(1, {"train/loss": 1.0})  # SWMR from here on
        sink.write_hparams({"note": "late"})  # needs the file reopened
        sink.write_scalars(2, {"train/loss": 0.5})
    with h5py.File(path, "r") as f:
        assert f.attrs["ntkcv_version"] == ntkcv.__version__
        created = datetime.datetime.fromisoformat(f.attrs["created"])
        assert abs((datetime.datetime.now(datetime.UTC) - created).total_seconds()) < 60
        hparams = f["hparams"].attrs
        assert hparams["lr"] == 0.1 and hparams["width"] == 64 and hparams["optimizer"] == "adam"
        np.testing.assert_array_equal(hparams["layers"], [2, 3])
        assert hparams["seed"] == "None" and hparams["extra"] == "{'a': 1}" and hparams["note"] == "late"
        assert f["hparam_metrics"].attrs["final/loss"] == 0.25
        np.testing.assert_array_equal(f["scalars/train/loss/step"][:], [0, 1, 2])


def test_readable_while_written_swmr(tmp_path):
    path = tmp_path / "run.h5"
    with HDF5Sink(path) as sink:
        sink.write_scalars(0, {"train/loss": 1.0})
        sink.write_scalars(1, {"train/loss": 0.5})
        sink.flush()
        assert sink.file.swmr_mode
        reader = subprocess.Popen([sys.executable, "-c", READER, str(path)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert json.loads(reader.stdout.readline()) == [[0, 1], [1.0, 0.5]]
            sink.write_scalars(2, {"train/loss": 0.25, "cv/trace": 3.0})  # a new name: reopened, reader unharmed
            sink.flush()
            reader.stdin.write("\n")
            reader.stdin.flush()
            assert json.loads(reader.stdout.readline()) == [[0, 1, 2], [1.0, 0.5, 0.25]]
            reader.stdin.write("\n")
            reader.stdin.flush()
            assert reader.wait(timeout=30) == 0
        finally:
            reader.kill()
        assert sink.file.swmr_mode
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["scalars/cv/trace/value"][:], [3.0])


def test_resume_truncates_rows_from_the_resume_step(tmp_path):
    path = tmp_path / "run.h5"
    with HDF5Sink(path) as sink:
        for step in range(10):
            sink.write_scalars(step, {"train/loss": float(step)})
            if step % 3 == 0:
                sink.write_arrays(step, {"cv/spectrum": np.full(2, float(step))})
    with h5py.File(path, "r") as f:
        created = f.attrs["created"]
    with HDF5Sink(path, resume_from_step=5) as sink:
        for step in range(5, 10):
            sink.write_scalars(step, {"train/loss": 100.0 + step})
            if step % 3 == 0:
                sink.write_arrays(step, {"cv/spectrum": np.full(2, 100.0 + step)})
    with h5py.File(path, "r") as f:
        assert f.attrs["created"] == created
        np.testing.assert_array_equal(f["scalars/train/loss/step"][:], np.arange(10))
        np.testing.assert_array_equal(f["scalars/train/loss/value"][:], [0, 1, 2, 3, 4, 105, 106, 107, 108, 109])
        np.testing.assert_array_equal(f["arrays/cv/spectrum/step"][:], [0, 3, 6, 9])
        np.testing.assert_array_equal(f["arrays/cv/spectrum/value"][:, 0], [0, 3, 106, 109])


def test_resume_with_out_of_order_steps_and_plain_append(tmp_path):
    path = tmp_path / "run.h5"
    with HDF5Sink(path, swmr=False) as sink:
        for step in (0, 7, 3, 8):
            sink.write_scalars(step, {"x": float(step)})
        assert not sink.file.swmr_mode
    HDF5Sink(path, resume_from_step=5).close()
    with HDF5Sink(path) as sink:  # no resume_from_step: appends
        sink.write_scalars(4, {"x": 4.0})
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["scalars/x/step"][:], [0, 3, 4])
        np.testing.assert_array_equal(f["scalars/x/value"][:], [0, 3, 4])


def test_user_errors(tmp_path):
    with HDF5Sink(tmp_path / "run.h5") as sink:
        sink.write_arrays(0, {"cv/spectrum": np.ones(3)})
        with pytest.raises(ValueError, match="'cv/spectrum' has 1 dimensions"):
            sink.write_arrays(1, {"cv/spectrum": np.ones((3, 3))})
        with pytest.raises(ValueError, match="must not end in"):
            sink.write_scalars(1, {"cv/step": 1.0})
        with pytest.raises(ValueError, match="step must be"):
            sink.write_scalars(-1, {"x": 1.0})
    with pytest.raises(ValueError, match="closed"):
        sink.write_scalars(2, {"x": 1.0})
    sink.close()


def test_lookup3_matches_the_reference_vectors_of_lookup3_c():
    """``driver5`` of Bob Jenkins' lookup3.c prints these (hashlittle with initval 0)."""
    assert lookup3(b"") == 0xDEADBEEF
    assert lookup3(b"Four score and seven years ago") == 0x17770551
    assert lookup3(b"Four score and seven years ago", 1) == 0xCD628161


def test_file_left_by_a_killed_swmr_writer_is_repaired_in_place_and_appended(tmp_path):
    path = tmp_path / "crashed.h5"
    script = (
        "import os, sys; from ntkcv.sinks import HDF5Sink\n"
        f"sink = HDF5Sink({str(path)!r})\n"
        "for step in range(5): sink.write_scalars(step, {'loss': float(step)})\n"
        "sink.flush()\n"
        "sink.write_scalars(5, {'loss': 5.0})\n"  # buffered, lost with the process
        "os.kill(os.getpid(), 9)\n"
    )
    subprocess.run([sys.executable, "-c", script], check=False)
    with pytest.raises(OSError, match="already open for write"):  # what a user's own h5py met before the repair
        h5py.File(path, "r")
    inode = path.stat().st_ino
    steps, values = read_scalars(path)["loss"]  # an ntkcv reader repairs the file
    assert list(steps) == [0, 1, 2, 3, 4] and list(values) == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert path.stat().st_ino == inode  # in place, not a copy
    with h5py.File(path, "r") as store:
        assert list(store["scalars/loss/step"][()]) == [0, 1, 2, 3, 4]
    path.unlink()
    subprocess.run([sys.executable, "-c", script], check=False)
    with HDF5Sink(path, resume_from_step=3) as sink:  # so does a writer
        sink.write_scalars(3, {"loss": 30.0})
    with h5py.File(path, "r") as store:
        assert list(store["scalars/loss/step"][()]) == [0, 1, 2, 3]
        assert list(store["scalars/loss/value"][()]) == [0.0, 1.0, 2.0, 30.0]
    assert not pathlib.Path(f"{path}.lock").exists()


LIVE_WRITER = """
import sys
from ntkcv._lock import LockedError
from ntkcv.report import read_scalars
from ntkcv.sinks import HDF5Sink
from ntkcv.sinks._superblock import lookup3
sink = HDF5Sink(sys.argv[1], flush_secs=0)
for step in range(200):
    sink.write_scalars(step, {"train/loss": float(step)})
print("written", flush=True)
sys.stdin.readline()
for step in range(200, 400):
    sink.write_scalars(step, {"train/loss": float(step)})
sink.close()
"""


def test_a_second_writer_is_refused_while_the_first_lives_and_no_row_is_lost(tmp_path):
    path = tmp_path / "run.h5"
    writer = subprocess.Popen([sys.executable, "-c", LIVE_WRITER, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "written"
        with pytest.raises(LockedError, match=rf"being written by another process \(pid {writer.pid} "):
            HDF5Sink(path, lock_timeout=0.2)
        steps, _ = read_scalars(path)["train/loss"]  # a reader is welcome: SWMR while the writer lives
        assert list(steps) == list(range(200))
        writer.stdin.write("\n")
        writer.stdin.flush()
        assert writer.wait(timeout=60) == 0
    finally:
        writer.kill()
    steps, values = read_scalars(path)["train/loss"]
    assert list(steps) == list(range(400)) and list(values) == list(range(400))


def test_a_truncated_store_is_a_clear_error_not_a_hang(tmp_path):
    path = tmp_path / "run.h5"
    with HDF5Sink(path) as sink:
        for step in range(3000):
            sink.write_scalars(step, {"train/loss": float(step)})
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    read = "import sys; from ntkcv.report import read_scalars; read_scalars(sys.argv[1])"
    done = subprocess.run([sys.executable, "-c", read, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert f"OSError: cannot read the HDF5 store {path}: " in done.stderr and "truncated file" in done.stderr


def test_scalars_reach_the_file_at_flush_or_after_flush_secs(tmp_path, monkeypatch):
    import ntkcv.sinks.hdf5 as module

    def rows(sink):  # what the file holds, through the writer's own handle
        return list(sink.file["scalars/loss/step"][()]) if "scalars/loss" in sink.file else []

    now = [0.0]
    monkeypatch.setattr(module.time, "monotonic", lambda: now[0])
    with HDF5Sink(tmp_path / "a.h5", flush_secs=10) as sink:
        sink.write_scalars(0, {"loss": 1.0})
        sink.write_scalars(1, {"loss": 0.5})
        assert rows(sink) == []  # buffered
        now[0] = 10.0
        sink.write_scalars(2, {"loss": 0.25})  # flush_secs passed: all three appended at once
        assert rows(sink) == [0, 1, 2]
        sink.write_scalars(3, {"loss": 0.1})
    with h5py.File(tmp_path / "a.h5", "r") as f:  # close flushes
        assert list(f["scalars/loss/step"][()]) == [0, 1, 2, 3]
        assert list(f["scalars/loss/value"][()]) == [1.0, 0.5, 0.25, 0.1]
    with HDF5Sink(tmp_path / "b.h5", flush_secs=0) as sink:
        sink.write_scalars(0, {"loss": 1.0})
        assert rows(sink) == [0]


def test_arrays_are_buffered_copied_and_widened_across_flushes(tmp_path, monkeypatch):
    import ntkcv.sinks.hdf5 as module

    def rows(sink):
        return list(sink.file["arrays/cv/spectrum/step"][()]) if "arrays/cv/spectrum" in sink.file else []

    now = [0.0]
    monkeypatch.setattr(module.time, "monotonic", lambda: now[0])
    with HDF5Sink(tmp_path / "a.h5", flush_secs=10, max_buffer_bytes=100) as sink:
        spectrum = np.array([3.0, 2.0, 1.0])
        sink.write_arrays(0, {"cv/spectrum": spectrum})
        spectrum[:] = -1.0  # the caller reuses its buffer: the sink kept a copy
        assert rows(sink) == []
        sink.flush()
        assert rows(sink) == [0]
        sink.write_arrays(1, {"cv/spectrum": np.arange(5.0)})
        now[0] = 10.0
        sink.write_arrays(2, {"cv/spectrum": np.ones(4)})  # flush_secs passed
        assert rows(sink) == [0, 1, 2]
        now[0] = 11.0
        sink.write_arrays(3, {"cv/spectrum": np.ones(20)})  # 160 bytes > max_buffer_bytes: written at once
        assert rows(sink) == [0, 1, 2, 3]
    with h5py.File(tmp_path / "a.h5", "r") as f:
        value = f["arrays/cv/spectrum/value"][()]
        assert value.shape == (4, 20)
        np.testing.assert_array_equal(value[0, :3], [3.0, 2.0, 1.0])
        np.testing.assert_array_equal(value[1, :5], np.arange(5.0))
        assert np.isnan(value[0, 3:]).all() and np.isnan(value[2, 4:]).all()
        np.testing.assert_array_equal(f["arrays/cv/spectrum/shape"][()].ravel(), [3, 5, 4, 20])
