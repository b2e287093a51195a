"""MLflow sink, via MLflow's tracking client (``mlflow-skinny`` suffices; imported only here)."""

from __future__ import annotations

import functools
import pathlib
import shutil
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import mlflow
import numpy as np
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

from ntkcv.sinks.base import Sink, call_all, check_step

#: The run's artifact folder of the arrays: ``arrays/<name>/<step, 9 digits>.npy``.
ARRAYS = "arrays"


class MLflowSink(Sink):
    """Logs to one MLflow run: scalars as metrics, arrays as ``.npy`` artifacts, hyper-parameters as params.

    Layout of the run::

        metric    <name>                          one value per step written (``cv/entropy``, ``train/loss``)
        artifact  arrays/<name>/<step:09d>.npy    each array, e.g. ``arrays/cv/spectrum/000000120.npy``
        param     <name>                          each hyper-parameter, as its ``str``
        tag       mlflow.runName and ``tags``

    Read it back with MLflow's client: ``MlflowClient(uri).get_metric_history(run_id, "cv/entropy")`` gives each
    step's value; ``mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="arrays/cv/spectrum",
    tracking_uri=uri)`` a folder whose files ``np.load`` reads, each named by its step. MLflow has no histograms;
    nothing is dropped. ``write_hparams``'s ``metrics`` are logged as metrics at the latest step seen. A parameter
    value longer than MLflow's limit (6000 characters) is cut to it; MLflow refuses to change a logged parameter.

    Buffering: metrics and parameters wait in memory, arrays in a temporary folder, and go to MLflow in one batch
    at :meth:`flush`, which runs by itself once ``flush_secs`` have passed since the last, and at :meth:`close` and
    :meth:`write_hparams` (a tracking store call per training step would cost more than the step).

    Failures: sending is synchronous, so a store that refuses (a deleted run, a server that is down) raises from
    the call that sends, as a ``RuntimeError`` naming the run and the store; every later call raises it too, and
    ``close`` still removes the temporary folder and marks the run ``FAILED``. What was not sent is lost. How long
    a send may wait is MLflow's: up to 20 s for a SQLite file that another writer holds, and its retries
    (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``) for a server.

    Resuming: MLflow cannot delete a logged value, so ``resume_from_step=s`` with the ``run_id`` of the run to
    resume starts a new run in its experiment, with its name and tags, the tag ``ntkcv.resumed_from`` naming it,
    and its metrics and arrays of steps ``< s`` (their values and times), then deletes the old run (MLflow keeps it
    restorable until ``mlflow gc``). The resumed run so holds each step once, as :class:`~ntkcv.sinks.HDF5Sink`
    and :class:`~ntkcv.sinks.TensorBoardSink` do; its id is :attr:`run_id`. Parameters are not copied: the resumed
    session logs them again (they may change, e.g. a longer ``train.steps``).

    Args:
      tracking_uri: the tracking store (``sqlite:///path/mlflow.db``, ``http://host:5000``); ``None``: MLflow's
        default (``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the working directory).
      experiment: the experiment of a new run, created if absent.
      artifact_location: where an experiment created here keeps its runs' artifacts (``None``: MLflow's default,
        the server's store, or ``./mlruns`` in the working directory for a local store).
      run_name: the name of a new run (``None``: MLflow picks one).
      tags: tags set on the run.
      run_id: log into this existing run instead of a new one (appending: MLflow keeps both values of a step
        logged twice), or, with ``resume_from_step``, resume it.
      resume_from_step: replace ``run_id``'s run by a new one holding its steps before this one (see above).
      flush_secs: longest time written data waits in the buffer (``0``: every call sends).

    Example::

        with MLflowSink("sqlite:///mlflow.db", experiment="mlp", run_name="width-128") as sink:
            sink.write_scalars(step, {"train/loss": 0.3, "cv/entropy": 2.1})
            sink.write_arrays(step, {"cv/spectrum": eigenvalues})
    """

    def __init__(self, tracking_uri: str | None = None, *, experiment: str = "ntkcv",
                 artifact_location: str | None = None, run_name: str | None = None,
                 tags: Mapping[str, str] | None = None, run_id: str | None = None,
                 resume_from_step: int | None = None, flush_secs: float = 10.0):
        if resume_from_step is not None:
            resume_from_step = check_step(resume_from_step)
            if run_id is None:
                raise ValueError("resume_from_step needs the run_id of the run to resume, got run_id=None")
        if not flush_secs >= 0:
            raise ValueError(f"flush_secs must be non-negative, got {flush_secs!r}")
        self.client = mlflow.MlflowClient(tracking_uri)
        self.tracking_uri: str = self.client.tracking_uri
        if run_id is None:
            experiment_id = _experiment_id(self.client, experiment, artifact_location)
            run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        elif resume_from_step is not None:
            run_id = _resume(self.client, run_id, resume_from_step)
        self.run_id: str = run_id
        if tags:
            self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()], synchronous=True)
        self.flush_secs = flush_secs
        self._metrics: list[Metric] = []
        self._params: list[Param] = []
        self._staging = pathlib.Path(tempfile.mkdtemp(prefix="ntkcv-mlflow-"))  # arrays not yet sent
        self._last_step = resume_from_step or 0
        self._flushed_at = time.monotonic()
        self._error: RuntimeError | None = None  # the store's failure, raised from every later call
        self._closed = False

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        step, timestamp = self._begin(step), _now_ms()
        self._metrics.extend(Metric(name, float(value), timestamp, step) for name, value in scalars.items())
        self._flush_if_due()

    def write_arrays(self, step: int, arrays: Mapping[str, np.ndarray]) -> None:
        step = self._begin(step)
        for name, array in arrays.items():
            if not name or any(part in ("", ".", "..") for part in name.split("/")):
                raise ValueError(f"array name must be '/'-separated non-empty parts other than . and .., got {name!r}")
            path = self._staging / ARRAYS / name / f"{step:09d}.npy"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, np.asarray(array))
        self._flush_if_due()

    def write_hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float] | None = None) -> None:
        self._check_writable()
        self._params.extend(Param(name, str(value)[:MAX_PARAM_VAL_LENGTH]) for name, value in hparams.items())
        timestamp = _now_ms()
        self._metrics.extend(Metric(name, float(value), timestamp, self._last_step)
                             for name, value in (metrics or {}).items())
        self.flush()

    def flush(self) -> None:
        """Sends the buffered metrics, parameters and arrays to the run."""
        if self._closed:
            return
        self._check()
        metrics, params, self._metrics, self._params = self._metrics, self._params, [], []
        try:
            if metrics or params:
                self.client.log_batch(self.run_id, metrics=metrics, params=params, synchronous=True)
            if (self._staging / ARRAYS).is_dir():
                self.client.log_artifacts(self.run_id, str(self._staging))
                shutil.rmtree(self._staging / ARRAYS)
        except Exception as error:
            self._error = RuntimeError(f"cannot log to MLflow run {self.run_id} in {self.tracking_uri}: {error}")
            raise self._error from error
        self._flushed_at = time.monotonic()

    def close(self) -> None:
        """Sends what is buffered, removes the temporary folder and ends the run (``FINISHED``, or ``FAILED``)."""
        if self._closed:
            return
        sending = [self.flush] if self._error is None else []  # a failure raised before is not raised again
        try:
            call_all([*sending, functools.partial(shutil.rmtree, self._staging, ignore_errors=True),
                      lambda: self.client.set_terminated(self.run_id, "FAILED" if self._error else "FINISHED")])
        finally:
            self._closed = True

    def _begin(self, step: int) -> int:
        self._check_writable()
        step = check_step(step)
        self._last_step = max(self._last_step, step)
        return step

    def _check_writable(self) -> None:
        if self._closed:
            raise ValueError(f"MLflowSink(run {self.run_id}) is closed")
        self._check()

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def _flush_if_due(self) -> None:
        if time.monotonic() - self._flushed_at >= self.flush_secs:
            self.flush()


def _now_ms() -> int:
    return int(time.time() * 1000)


def _experiment_id(client: mlflow.MlflowClient, name: str, artifact_location: str | None) -> str:
    """The id of the active experiment ``name``, created if absent (also when another process creates it too)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location)
        except MlflowException as error:
            if error.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
            experiment = client.get_experiment_by_name(name)
    if experiment.lifecycle_stage != "active":
        raise ValueError(f"experiment must be an active MLflow experiment, and {name!r} in {client.tracking_uri} is "
                         "deleted: restore it (mlflow experiments restore) or choose another name")
    return experiment.experiment_id


def _resume(client: mlflow.MlflowClient, run_id: str, step: int) -> str:
    """A new run like ``run_id``'s holding its metrics and arrays of steps ``< step``; ``run_id``'s run is deleted."""
    old = client.get_run(run_id)
    tags = {key: value for key, value in old.data.tags.items() if not key.startswith("mlflow.")}
    new = client.create_run(old.info.experiment_id, run_name=old.info.run_name,
                            tags={**tags, "ntkcv.resumed_from": run_id}).info.run_id
    kept = [Metric(m.key, m.value, m.timestamp, m.step)
            for key in old.data.metrics for m in client.get_metric_history(run_id, key) if m.step < step]
    client.log_batch(new, metrics=kept, synchronous=True)
    if client.list_artifacts(run_id, ARRAYS):
        with tempfile.TemporaryDirectory(prefix="ntkcv-mlflow-") as folder:
            arrays = pathlib.Path(client.download_artifacts(run_id, ARRAYS, folder))
            for path in arrays.rglob("*.npy"):
                if int(path.stem) >= step:
                    path.unlink()
            client.log_artifacts(new, str(arrays), ARRAYS)
    client.delete_run(run_id)
    return new
