"""A sink over a clu / jax-loop-utils ``MetricWriter`` (neither package is imported: any object with its methods)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ntkcv.sinks.base import Sink, check_step, histogram_values


class MetricWriterSink(Sink):
    """Writes to a ``MetricWriter``: of clu (``clu.metric_writers``), of jax-loop-utils, or any of that interface.

    Scalars go to ``write_scalars`` under the names given, as Python floats. Each array goes to ``write_histograms``
    with its finite entries (an array with none is dropped); a spectrum (an array named ``…spectrum``) becomes the
    histogram ``…spectrum_log10`` of the log10 of its positive eigenvalues, as in
    :class:`~ntkcv.sinks.TensorBoardSink`. Hyper-parameters go to ``write_hparams`` (which a ``MetricWriter`` takes
    once); their ``metrics`` to ``write_scalars`` at the latest step seen. ``flush`` and ``close`` flush and close
    the writer: the sink owns it.

    Calls reach the writer in the order they come: an asynchronous :class:`~ntkcv.NTKMonitor` writes a firing's
    CVs at a later call, after the loss of later steps, and a step's loss and CVs in separate calls. Writers that
    store by step (TensorBoard's, MLflow's, logging) take that; jax-loop-utils' ``MemoryWriter``, which takes each
    step once and in increasing order, suits a synchronous monitor and ``write_hparams`` without metrics. What a
    writer cannot store it handles as it documents (jax-loop-utils' MLflow writer drops histograms). Errors are
    the writer's, raised from the call.

    Args:
      writer: the ``MetricWriter``.

    Example::

        from jax_loop_utils.metric_writers import LoggingWriter

        monitor = ntkcv.NTKMonitor(model, x_probe, sinks=[MetricWriterSink(LoggingWriter())])
    """

    def __init__(self, writer: Any):
        self.writer = writer
        self._last_step = 0
        self._closed = False

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        step = self._begin(step)
        self.writer.write_scalars(step, {name: float(value) for name, value in scalars.items()})

    def write_arrays(self, step: int, arrays: Mapping[str, np.ndarray]) -> None:
        step = self._begin(step)
        histograms = histogram_values(arrays)
        if histograms:
            self.writer.write_histograms(step, histograms)

    def write_hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float] | None = None) -> None:
        self._check_open()
        self.writer.write_hparams(dict(hparams))
        if metrics:
            self.writer.write_scalars(self._last_step, {name: float(value) for name, value in metrics.items()})

    def flush(self) -> None:
        if not self._closed:
            self.writer.flush()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.writer.close()

    def _begin(self, step: int) -> int:
        self._check_open()
        step = check_step(step)
        self._last_step = max(self._last_step, step)
        return step

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("MetricWriterSink is closed")
