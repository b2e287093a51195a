"""MetricWriterSink with jax-loop-utils' own writers: in memory, to the log, and to MLflow read back by MlflowClient."""

import logging
import re

import jax.numpy as jnp
import numpy as np
import pytest

metric_writers = pytest.importorskip("jax_loop_utils.metric_writers")

import ntkcv  # noqa: E402
from ntkcv.sinks import MetricWriterSink  # noqa: E402


def test_scalars_histograms_and_hparams_reach_a_memory_writer():
    writer = metric_writers.MemoryWriter()
    spectrum = np.array([100.0, 1.0, 0.01, 0.0, -1e-7, np.nan])
    with MetricWriterSink(writer) as sink:
        sink.write_hparams({"optimizer.learning_rate": 0.01, "model.widths": "(16,)"})
        sink.write_scalars(0, {"train/loss": np.float32(0.5), "cv/entropy": 2})
        sink.write_arrays(0, {"cv/spectrum": spectrum, "weights/Dense_0/singular_values": np.array([3.0, np.inf, 1.0]),
                              "cv/nothing_finite": np.array([np.nan])})
        sink.write_scalars(10, {"train/loss": 0.25})
        sink.write_arrays(10, {"cv/test/spectrum": np.array([0.0, -1.0])})  # no positive eigenvalue: dropped
    assert writer.scalars == {0: {"train/loss": 0.5, "cv/entropy": 2.0}, 10: {"train/loss": 0.25}}
    assert {type(value) for values in writer.scalars.values() for value in values.values()} == {float}
    assert list(writer.histograms) == [0]
    histograms = writer.histograms[0].arrays
    assert set(histograms) == {"cv/spectrum_log10", "weights/Dense_0/singular_values"}
    np.testing.assert_allclose(histograms["cv/spectrum_log10"], [2.0, 0.0, -2.0])  # log10 of the positive ones
    np.testing.assert_array_equal(histograms["weights/Dense_0/singular_values"], [3.0, 1.0])
    assert writer.hparams == {"optimizer.learning_rate": 0.01, "model.widths": "(16,)"}
    with pytest.raises(ValueError, match="MetricWriterSink is closed"):
        sink.write_scalars(11, {"train/loss": 0.1})
    sink.close()


def test_a_logging_writer_logs_each_call(caplog):
    caplog.set_level(logging.INFO, logger="absl")
    with MetricWriterSink(metric_writers.LoggingWriter()) as sink:
        sink.write_scalars(3, {"train/loss": 0.25, "cv/entropy": 1.5})
        sink.write_arrays(3, {"cv/spectrum": np.array([10.0, 1.0, 0.1, 0.0])})
        sink.write_hparams({"train.steps": 40}, {"final/test_accuracy": 0.875})
    lines = [record.getMessage() for record in caplog.records if record.name == "absl"]
    assert lines[0] == "[3] cv/entropy=1.5, train/loss=0.25"
    assert lines[1].startswith("[3] Histogram for 'cv/spectrum_log10' = {[-1, ")
    assert sum(int(count) for count in re.findall(r"[)\]]: (\d+)", lines[1])) == 3  # the three positive eigenvalues
    assert lines[2:] == ["[Hyperparameters] {'train.steps': 40}", "[3] final/test_accuracy=0.875"]


def test_an_mlflow_writer_read_back_with_mlflow_client(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    from jax_loop_utils.metric_writers.mlflow import MlflowMetricWriter
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)  # the writer's experiment keeps MLflow's default artifact folder, ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    writer = MlflowMetricWriter("ntkcv", run_name="writer", tracking_uri=uri)
    with MetricWriterSink(writer) as sink:
        for step in range(4):
            sink.write_scalars(step, {"train/loss": 1.0 / (step + 1)})
        sink.write_scalars(2, {"cv/entropy": 1.25})
        sink.write_arrays(2, {"cv/spectrum": np.array([1.0, 0.5])})  # MLflow has no histograms: the writer drops it
        sink.write_hparams({"optimizer.learning_rate": 0.01}, {"final/test_accuracy": 0.875})
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("ntkcv").experiment_id])
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")] == [
        (step, 1.0 / (step + 1)) for step in range(4)]
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "cv/entropy")] == [(2, 1.25)]
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "final/test_accuracy")] == [
        (3, 0.875)]  # at the latest step
    assert run.data.params == {"optimizer.learning_rate": "0.01"}
    assert run.info.status == "FINISHED"  # the sink closed the writer, which ended the run


def test_a_synchronous_monitor_writes_each_step_once_in_order():
    """f(x; w) = w²·x/2 on inputs (n, 1): the NTK is w²·xxᵀ, of trace and only positive eigenvalue w²·|x|²."""
    x = jnp.linspace(-1.0, 2.0, 6)[:, None]
    writer = metric_writers.MemoryWriter()
    monitor = ntkcv.NTKMonitor(lambda p, x: 0.5 * p["w"] ** 2 * x, x, cvs=("trace",),
                               schedule=ntkcv.Schedule(every_steps=2), sinks=[MetricWriterSink(writer)])
    weights = [1.0, 1.5, 2.0, 3.0]
    with monitor:
        for step, w in enumerate(weights):
            monitor(step, {"w": jnp.asarray(w)}, loss=float(step))
    assert list(writer.scalars) == [0, 1, 2, 3] and list(writer.histograms) == [0, 2]
    norm = float(jnp.sum(x**2))
    for step in (0, 2):
        assert writer.scalars[step]["cv/trace"] == pytest.approx(weights[step] ** 2 * norm, rel=1e-5)
        log_spectrum = writer.histograms[step].arrays["cv/spectrum_log10"]
        assert log_spectrum.max() == pytest.approx(np.log10(weights[step] ** 2 * norm), abs=1e-5)
    assert [writer.scalars[step]["train/loss"] for step in range(4)] == [0.0, 1.0, 2.0, 3.0]
