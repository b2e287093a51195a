"""MLflowSink against a real SQLite tracking store, read back with MLflow's own client."""

import pathlib

import numpy as np
import pytest

mlflow = pytest.importorskip("mlflow")
pytest.importorskip("sqlalchemy")

from mlflow import MlflowClient  # noqa: E402

from ntkcv.sinks.mlflow import MLflowSink  # noqa: E402


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SQLite tracking store shared by the module's tests (creating its tables takes seconds) and an artifact
    folder; each test logs to an experiment of its own."""
    folder = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{folder / 'mlflow.db'}", folder


@pytest.fixture
def sink_args(store, request):
    uri, folder = store
    return {"tracking_uri": uri, "experiment": request.node.name, "artifact_location": str(folder / request.node.name)}


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((metric.step, metric.value) for metric in client.get_metric_history(run_id, key))


def _arrays(uri: str, run_id: str, name: str, destination: pathlib.Path) -> dict[int, np.ndarray]:
    """The run's arrays of ``name`` by step, as a user reads them: downloaded, each file named by its step."""
    folder = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"arrays/{name}",
                                                 dst_path=str(destination), tracking_uri=uri)
    return {int(path.stem): np.load(path) for path in sorted(pathlib.Path(folder).glob("*.npy"))}


def test_metrics_params_and_arrays_round_trip(sink_args, tmp_path):
    spectra = {0: np.array([3.0, 1.0, 0.0]), 5: np.array([4.0, 2.0, 1e-9, 0.5]), 9: np.array([1.0])}
    with MLflowSink(**sink_args, run_name="mlp", tags={"ntkcv.run_dir": "/runs/mlp"}) as sink:
        for step in range(10):
            sink.write_scalars(step, {"train/loss": 1.0 / (step + 1)})
            if step in spectra:
                sink.write_scalars(step, {"cv/entropy": np.float32(0.5 * step), "cv/trace": np.nan})
                sink.write_arrays(step, {"cv/spectrum": spectra[step], "cv/layer/0/spectrum": 2 * spectra[step]})
        sink.write_hparams({"optimizer.learning_rate": 0.01, "model.widths": "(16,)", "data.path": None},
                           {"final/test_accuracy": 0.875})
    client = MlflowClient(sink_args["tracking_uri"])
    assert _history(client, sink.run_id, "train/loss") == [(step, 1.0 / (step + 1)) for step in range(10)]
    assert _history(client, sink.run_id, "cv/entropy") == [(0, 0.0), (5, 2.5), (9, 4.5)]
    assert [step for step, value in _history(client, sink.run_id, "cv/trace") if np.isnan(value)] == [0, 5, 9]
    assert _history(client, sink.run_id, "final/test_accuracy") == [(9, 0.875)]  # at the latest step
    run = client.get_run(sink.run_id)
    assert run.data.params == {"optimizer.learning_rate": "0.01", "model.widths": "(16,)", "data.path": "None"}
    assert (run.info.run_name, run.data.tags["ntkcv.run_dir"], run.info.status) == ("mlp", "/runs/mlp", "FINISHED")
    assert run.info.artifact_uri.startswith(sink_args["artifact_location"])
    for name, scale in (("cv/spectrum", 1.0), ("cv/layer/0/spectrum", 2.0)):
        arrays = _arrays(sink_args["tracking_uri"], sink.run_id, name, tmp_path / name)
        assert list(arrays) == list(spectra)
        for step, spectrum in spectra.items():
            np.testing.assert_array_equal(arrays[step], scale * spectrum)


def test_data_is_sent_at_flush_or_once_flush_secs_passed(sink_args, monkeypatch):
    import ntkcv.sinks.mlflow as module

    now = [0.0]
    monkeypatch.setattr(module.time, "monotonic", lambda: now[0])
    client = MlflowClient(sink_args["tracking_uri"])
    with MLflowSink(**sink_args, flush_secs=10) as sink:
        sink.write_scalars(0, {"loss": 1.0})
        sink.write_arrays(0, {"spectrum": np.ones(2)})
        assert client.get_metric_history(sink.run_id, "loss") == [] and client.list_artifacts(sink.run_id) == []
        now[0] = 10.0
        sink.write_scalars(1, {"loss": 0.5})  # flush_secs passed: both steps and the array are sent
        assert _history(client, sink.run_id, "loss") == [(0, 1.0), (1, 0.5)]
        sent = [file.path for file in client.list_artifacts(sink.run_id, "arrays/spectrum")]
        assert sent == ["arrays/spectrum/000000000.npy"]
        sink.write_scalars(2, {"loss": 0.25})
        sink.flush()
        assert _history(client, sink.run_id, "loss")[-1] == (2, 0.25)
        sink.write_scalars(3, {"loss": 0.125})
    assert _history(client, sink.run_id, "loss")[-1] == (3, 0.125)  # close sends the rest


def test_resume_leaves_each_step_once_in_a_new_run_and_deletes_the_old_one(sink_args, tmp_path):
    client = MlflowClient(sink_args["tracking_uri"])
    with MLflowSink(**sink_args, run_name="run", tags={"ntkcv.run_dir": "/runs/a"}) as first:
        for step in range(10):  # the first session got to step 9; its last checkpoint was after step 5
            first.write_scalars(step, {"train/loss": float(step)})
            if step % 3 == 0:
                first.write_arrays(step, {"cv/spectrum": np.full(2, float(step))})
        first.write_hparams({"train.steps": 10}, {"final/loss": 9.0})
    with MLflowSink(sink_args["tracking_uri"], run_id=first.run_id, resume_from_step=6) as resumed:
        for step in range(6, 13):
            resumed.write_scalars(step, {"train/loss": -float(step)})
            if step % 3 == 0:
                resumed.write_arrays(step, {"cv/spectrum": np.full(2, -float(step))})
        resumed.write_hparams({"train.steps": 13}, {"final/loss": -12.0})  # a changed param: the new run has none
    assert resumed.run_id != first.run_id
    assert _history(client, resumed.run_id, "train/loss") == [(s, float(s) if s < 6 else -float(s)) for s in range(13)]
    assert _history(client, resumed.run_id, "final/loss") == [(12, -12.0)]  # the first session's was at step 9
    arrays = _arrays(sink_args["tracking_uri"], resumed.run_id, "cv/spectrum", tmp_path)
    assert {step: array[0] for step, array in arrays.items()} == {0: 0.0, 3: 3.0, 6: -6.0, 9: -9.0, 12: -12.0}
    run, old = client.get_run(resumed.run_id), client.get_run(first.run_id)
    assert run.data.params == {"train.steps": "13"}
    assert (run.info.run_name, run.data.tags["ntkcv.run_dir"]) == ("run", "/runs/a")
    assert run.data.tags["ntkcv.resumed_from"] == first.run_id
    assert (old.info.lifecycle_stage, run.info.lifecycle_stage) == ("deleted", "active")


def test_logging_into_a_run_without_resume_appends(sink_args):
    with MLflowSink(**sink_args) as first:
        first.write_scalars(0, {"loss": 1.0})
    with MLflowSink(sink_args["tracking_uri"], run_id=first.run_id) as again:
        again.write_scalars(0, {"loss": 2.0})
    assert again.run_id == first.run_id
    assert _history(MlflowClient(sink_args["tracking_uri"]), first.run_id, "loss") == [(0, 1.0), (0, 2.0)]


def test_a_failing_store_raises_from_the_call_that_sends_and_every_later_one(sink_args):
    client = MlflowClient(sink_args["tracking_uri"])
    sink = MLflowSink(**sink_args, flush_secs=100)
    sink.write_scalars(0, {"loss": 1.0})
    client.delete_run(sink.run_id)  # deleted meanwhile (in MLflow's UI, say): the store refuses to log to it
    message = rf"cannot log to MLflow run {sink.run_id} in sqlite:///.*mlflow\.db: .*must be in the 'active' state"
    with pytest.raises(RuntimeError, match=message):
        sink.flush()
    with pytest.raises(RuntimeError, match=message):
        sink.write_scalars(1, {"loss": 0.5})
    client.restore_run(sink.run_id)
    sink.close()  # the failure was raised before, so not again: close releases the rest and marks the run
    assert client.get_run(sink.run_id).info.status == "FAILED"
    assert client.get_metric_history(sink.run_id, "loss") == []
    assert not sink._staging.exists()
    with pytest.raises(ValueError, match="closed"):
        sink.write_scalars(2, {"loss": 0.25})
    sink.close()


def test_user_errors(sink_args):
    with pytest.raises(ValueError, match="resume_from_step needs the run_id of the run to resume, got run_id=None"):
        MLflowSink(**sink_args, resume_from_step=3)
    with pytest.raises(ValueError, match="flush_secs must be non-negative, got -1"):
        MLflowSink(**sink_args, flush_secs=-1)
    deleted = MlflowClient(sink_args["tracking_uri"]).create_experiment("deleted")
    MlflowClient(sink_args["tracking_uri"]).delete_experiment(deleted)
    with pytest.raises(ValueError, match="experiment must be an active MLflow experiment, and 'deleted' in sqlite:///"):
        MLflowSink(sink_args["tracking_uri"], experiment="deleted")
    with MLflowSink(**sink_args) as sink:
        with pytest.raises(ValueError, match=r"array name must be .* got '\.\./x'"):
            sink.write_arrays(0, {"../x": np.ones(2)})
        with pytest.raises(TypeError, match="step must be a non-negative integer"):
            sink.write_scalars(1.5, {"loss": 1.0})
