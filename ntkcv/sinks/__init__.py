"""Sinks: where the training monitor writes scalars, arrays and hyper-parameters.

:class:`Sink` is the interface and :class:`MultiSink` fans out to several sinks. The backends import
their heavy dependency (tensorboardX, h5py, rich, mlflow) only when first used; :class:`MetricWriterSink` wraps a
clu / jax-loop-utils ``MetricWriter`` and imports neither.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ntkcv.sinks.base import MultiSink, Sink

if TYPE_CHECKING:
    from ntkcv.sinks.console import ConsoleSink
    from ntkcv.sinks.hdf5 import HDF5Sink
    from ntkcv.sinks.metric_writer import MetricWriterSink
    from ntkcv.sinks.mlflow import MLflowSink
    from ntkcv.sinks.tensorboard import TensorBoardSink

__all__ = ["ConsoleSink", "HDF5Sink", "MLflowSink", "MetricWriterSink", "MultiSink", "Sink", "TensorBoardSink"]

_BACKENDS = {"ConsoleSink": "console", "HDF5Sink": "hdf5", "MLflowSink": "mlflow", "MetricWriterSink": "metric_writer",
             "TensorBoardSink": "tensorboard"}


def __getattr__(name: str) -> Any:
    if name in _BACKENDS:
        return getattr(importlib.import_module(f"ntkcv.sinks.{_BACKENDS[name]}"), name)
    raise AttributeError(f"module 'ntkcv.sinks' has no attribute {name!r}")
