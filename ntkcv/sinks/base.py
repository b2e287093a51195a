"""The sink interface: where the monitor's scalars, arrays and hyper-parameters go.

A sink receives host data only (Python floats, NumPy arrays) after the monitor's single
``jax.device_get``; it never runs inside ``jit``.

Policy for unsupported data kinds: every sink accepts every call. A kind of data that a backend cannot
store (arrays on the console, say) is dropped silently, without error or warning; each sink's class
docstring says what it drops. ``close`` is idempotent; writing after ``close`` is an error.

Several processes (``jax.distributed``): the monitor writes on process 0 only. Make sinks that own a file or a run
there only (``[HDF5Sink(path)] if jax.process_index() == 0 else []``): they open it when made, and two processes must
not write the same file.

Policy for failures: a sink whose backend fails (a full disk, a dead writer thread) raises from its next call,
within seconds and without blocking, and its ``close`` still releases what it can. Whoever writes to several
sinks (:class:`MultiSink`, the monitor) lets every sink have its call before raising the first error.

How to add another sink (W&B, say)
----------------------------------
Subclass :class:`Sink` and implement its five methods; import the backend's package in your module only.
:class:`~ntkcv.sinks.mlflow.MLflowSink` (``ntkcv/sinks/mlflow.py``) is a worked example: buffering, a failure
kept and raised, resuming on an append-only backend. A backend that has a clu / jax-loop-utils ``MetricWriter``
needs no sink of its own: wrap the writer in :class:`~ntkcv.sinks.metric_writer.MetricWriterSink`.

Test a new sink by writing a few steps and reading them back with the backend's own reader, as
``tests/sinks`` does for TensorBoard, HDF5 and MLflow.
"""

from __future__ import annotations

import abc
import functools
import numbers
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import numpy as np

_T = TypeVar("_T")


def check_step(step: int) -> int:
    """Returns ``step`` as a Python int; raises if it is not a non-negative integer."""
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise TypeError(f"step must be a non-negative integer, got {step!r} of type {type(step).__name__}")
    if step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step}")
    return int(step)


#: Arrays whose last name part is one of these become histograms of their log10 (positive entries only): on a linear
#: scale an NTK spectrum is one spike at zero beside the top eigenvalue.
LOG_SCALE_ARRAYS = ("spectrum",)


def histogram_values(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The finite entries of each array, flattened, for a histogram; a spectrum (``…spectrum``, see
    :data:`LOG_SCALE_ARRAYS`) becomes ``…spectrum_log10``, the log10 of its positive entries. Arrays with no such
    entries are left out."""
    histograms = {}
    for name, array in arrays.items():
        values = np.asarray(array, dtype=np.float64).ravel()
        if name.rsplit("/", 1)[-1] in LOG_SCALE_ARRAYS:
            values = np.log10(values[values > 0])
            name = f"{name}_log10"
        values = values[np.isfinite(values)]
        if values.size:
            histograms[name] = values
    return histograms


class Sink(abc.ABC):
    """Destination for training-monitor data: scalars, arrays and hyper-parameters.

    Implementations write ``scalars`` and ``arrays`` under the names given (``cv/entropy``,
    ``train/loss``, ``cv/spectrum``), indexed by the training ``step``. A sink is a context manager that
    closes itself on exit.
    """

    @abc.abstractmethod
    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Writes one value per name at ``step``."""

    @abc.abstractmethod
    def write_arrays(self, step: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Writes one array per name at ``step`` (an eigenvalue spectrum ``(n,)``, a kernel ``(n, n)``)."""

    @abc.abstractmethod
    def write_hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float] | None = None) -> None:
        """Records the run's hyper-parameters and, optionally, summary metrics to compare runs by."""

    @abc.abstractmethod
    def flush(self) -> None:
        """Makes everything written so far visible to readers."""

    @abc.abstractmethod
    def close(self) -> None:
        """Flushes and releases the backend; calling it again does nothing."""

    def __enter__(self) -> Sink:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class MultiSink(Sink):
    """Fans every call out to several sinks, in order.

    Every call reaches every sink even when one of them raises; the first error is re-raised afterwards
    (see :func:`call_all`).

    Args:
      sinks: the sinks to write to.
    """

    def __init__(self, sinks: Iterable[Sink]):
        self.sinks = list(sinks)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        call_all([functools.partial(sink.write_scalars, step, scalars) for sink in self.sinks])

    def write_arrays(self, step: int, arrays: Mapping[str, np.ndarray]) -> None:
        call_all([functools.partial(sink.write_arrays, step, arrays) for sink in self.sinks])

    def write_hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float] | None = None) -> None:
        call_all([functools.partial(sink.write_hparams, hparams, metrics) for sink in self.sinks])

    def flush(self) -> None:
        call_all([sink.flush for sink in self.sinks])

    def close(self) -> None:
        call_all([sink.close for sink in self.sinks])


def call_all(calls: Iterable[Callable[[], _T]]) -> list[_T]:
    """Makes every call, in order, even when some raise; then raises the first error, or returns their results.

    The one fan-out policy of the sinks and the monitor: a failing sink (a full disk, a dead backend) keeps
    neither the other sinks from getting their data nor the rest of a shutdown from running.
    """
    results, errors = [], []
    for call in calls:
        try:
            results.append(call())
        except Exception as error:  # re-raised below, once every call had its turn
            errors.append(error)
    if errors:
        raise errors[0]
    return results
