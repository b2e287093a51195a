import errno
import os
import re
import threading
import time

import numpy as np
import pytest

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboardX.record_writer import RecordWriter

from ntkcv.sinks import TensorBoardSink
from ntkcv.sinks.tensorboard import DEFAULT_LAYOUT


def read(logdir):
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalars(acc, tag):
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_scalars_and_histograms_round_trip(tmp_path):
    spectrum = np.array([1e-3, 0.5, 2.0, 40.0, -1e-9])  # a rounding-error negative eigenvalue
    with TensorBoardSink(tmp_path) as sink:
        for step in range(5):
            sink.write_scalars(step, {"cv/entropy": 0.5 * step, "train/loss": np.float32(1 / (step + 1))})
        sink.write_arrays(4, {"cv/spectrum": spectrum, "cv/empty": np.array([np.nan]),
                              "cv/kernel": np.array([[1.0, -1.0], [2.0, 0.0]])})
    acc = read(tmp_path)
    assert {"cv/entropy", "train/loss"} <= set(acc.Tags()["scalars"])
    assert scalars(acc, "cv/entropy") == [(s, 0.5 * s) for s in range(5)]
    assert [s for s, _ in scalars(acc, "train/loss")] == list(range(5))
    np.testing.assert_allclose([v for _, v in scalars(acc, "train/loss")], [1 / (s + 1) for s in range(5)], rtol=1e-6)
    assert sorted(acc.Tags()["histograms"]) == ["cv/kernel", "cv/spectrum_log10"]  # the all-NaN array is dropped
    (event,) = acc.Histograms("cv/spectrum_log10")  # a spectrum's histogram is of its log10 (positive entries)
    assert event.step == 4
    hist = event.histogram_value
    assert (hist.num, hist.min, hist.max) == (4, pytest.approx(-3), pytest.approx(np.log10(40.0)))
    assert hist.sum == pytest.approx(np.log10(spectrum[spectrum > 0]).sum())
    (event,) = acc.Histograms("cv/kernel")  # other arrays as they are
    assert (event.histogram_value.num, event.histogram_value.min, event.histogram_value.max) == (4, -1.0, 2.0)


def test_hparams_land_in_the_same_run_directory(tmp_path):
    with TensorBoardSink(tmp_path) as sink:
        sink.write_scalars(2, {"train/loss": 1.0})
        sink.write_hparams({"lr": 0.1, "width": np.int64(64), "optimizer": "adam", "layers": [2, 3], "seed": None},
                           {"final/loss": 0.25})
    assert all(os.path.isfile(tmp_path / name) for name in os.listdir(tmp_path))  # no sub-run
    acc = read(tmp_path)
    content = acc.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"} <= set(content)
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = start.session_start_info.hparams
    assert hparams["lr"].number_value == 0.1 and hparams["width"].number_value == 64
    assert hparams["optimizer"].string_value == "adam" and hparams["layers"].string_value == "[2, 3]"
    assert "seed" not in hparams
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert [m.name.tag for m in experiment.metric_infos] == ["final/loss"]
    assert scalars(acc, "final/loss") == [(2, 0.25)]  # at the latest step written


def test_custom_scalars_layout(tmp_path):
    TensorBoardSink(tmp_path).close()
    acc = read(tmp_path)
    assert "custom_scalars__config__" in acc.PluginTagToContent("custom_scalars")
    (event,) = acc.Tensors("custom_scalars__config__")  # where TensorBoard's custom-scalars plugin reads it
    layout = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    (category,) = layout.category
    assert category.title == "ntkcv"
    charts = {chart.title: list(chart.multiline.tag) for chart in category.chart}
    assert charts == {name: list(tags) for name, tags in DEFAULT_LAYOUT.items()}
    tags = ["cv/entropy", "cv/train/entropy", "cv/test/entropy", "cv/train/layer/Dense_0/entropy",
            "cv/test/relative_distance", "cv/kernel_velocity"]
    matched = {title: [tag for tag in tags if any(re.search(pattern, tag) for pattern in patterns)]
               for title, patterns in charts.items()}
    assert matched["entropy (train and test probes)"] == ["cv/entropy", "cv/train/entropy", "cv/test/entropy"]
    assert matched["drift from the first kernel"] == ["cv/test/relative_distance"]
    assert matched["kernel velocity"] == ["cv/kernel_velocity"]


def test_no_layout(tmp_path):
    TensorBoardSink(tmp_path, layout=None).close()
    with pytest.raises(KeyError):
        read(tmp_path).PluginTagToContent("custom_scalars")


def test_purge_step_leaves_each_step_once_after_resume(tmp_path):
    with TensorBoardSink(tmp_path) as sink:
        for step in range(10):
            sink.write_scalars(step, {"cv/entropy": float(step)})
    with TensorBoardSink(tmp_path, purge_step=5) as sink:
        for step in range(5, 10):
            sink.write_scalars(step, {"cv/entropy": 100.0 + step})
    assert len(os.listdir(tmp_path)) == 2  # the second session did not overwrite the first file
    assert scalars(read(tmp_path), "cv/entropy") == [(s, float(s)) for s in range(5)] + [
        (s, 100.0 + s) for s in range(5, 10)]


def test_flush_secs_is_passed_through_and_flush_makes_events_readable(tmp_path):
    sink = TensorBoardSink(tmp_path, flush_secs=7, max_queue=1000)
    assert sink.writer._flush_secs == 7
    assert sink.writer.file_writer.event_writer._flush_secs == 7
    assert TensorBoardSink(tmp_path / "default").writer._flush_secs == 30
    sink.write_scalars(0, {"train/loss": 1.0})
    sink.flush()
    assert scalars(read(tmp_path), "train/loss") == [(0, 1.0)]
    sink.close()
    sink.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        sink.write_scalars(1, {"train/loss": 1.0})


@pytest.mark.parametrize(("kwargs", "match"), [({"flush_secs": 0}, "flush_secs"), ({"purge_step": -1}, "step")])
def test_rejects_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        TensorBoardSink(tmp_path, **kwargs)


def _within(seconds, function):
    """Returns ``function()``, run in a thread; fails instead of hanging if it takes longer than ``seconds``."""
    outcome = {}

    def run():
        try:
            outcome["value"] = function()
        except BaseException as error:  # re-raised in the test's thread
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still blocked after {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _full_disk(*args):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_raises_from_the_next_write_instead_of_blocking(tmp_path, monkeypatch):
    sink = TensorBoardSink(tmp_path, max_queue=2)  # a dead writer thread would block the third put
    monkeypatch.setattr(RecordWriter, "write", _full_disk)

    def write_until_it_raises():
        started = time.monotonic()
        with pytest.raises(OSError) as raised:
            for step in range(100_000):
                sink.write_scalars(step, {"train/loss": 1.0})
        return raised.value, time.monotonic() - started

    error, seconds = _within(10, write_until_it_raises)
    assert seconds < 5
    assert error.errno == errno.ENOSPC and isinstance(error.__cause__, OSError)
    assert str(tmp_path) in str(error) and "No space left on device" in str(error)
    for call in (sink.flush, lambda: sink.write_arrays(1, {"cv/spectrum": np.ones(3)}),
                 lambda: sink.write_hparams({"lr": 0.1})):
        with pytest.raises(OSError, match="No space left on device"):
            _within(10, call)
    _within(10, sink.close)  # the failure was raised already; the thread stops and the file is closed
    assert sink._events._closed and sink._file._file._writer.closed
    sink.close()


def test_close_raises_a_failure_not_raised_before(tmp_path, monkeypatch):
    sink = TensorBoardSink(tmp_path)
    monkeypatch.setattr(RecordWriter, "flush", _full_disk)
    sink.write_scalars(0, {"train/loss": 1.0})
    with pytest.raises(OSError, match=re.escape(f"{tmp_path}: No space left on device")):
        _within(10, sink.close)
    sink.close()


def test_a_stopped_writer_thread_raises_and_close_does_not_block(tmp_path):
    sink = TensorBoardSink(tmp_path, max_queue=2, layout=None)
    sink._events._worker.stop()  # as if it had died
    with pytest.raises(OSError, match="writer thread stopped"):
        sink.write_scalars(0, {"train/loss": 1.0})
    for step in range(2):  # fill its queue behind the sink's back
        sink._writer.add_scalar("train/loss", 1.0, step)
    with pytest.raises(OSError, match="writer thread stopped"):
        _within(10, sink.flush)
    _within(10, sink.close)
    assert scalars(read(tmp_path), "train/loss") == [(0, 1.0), (1, 1.0)]  # a new thread wrote the queue out
