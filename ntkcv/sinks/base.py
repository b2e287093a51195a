"""The sink interface: where the monitor's scalars, arrays and hyper-parameters go.

A sink receives host data only (Python floats, NumPy arrays) after the monitor's single
``jax.device_get``; it never runs inside ``jit``.

Policy for unsupported data kinds: every sink accepts every call. A kind of data that a backend cannot
store (arrays on the console, say) is dropped silently, without error or warning; each sink's class
docstring says what it drops. ``close`` is idempotent; writing after ``close`` is an error.

Policy for failures: a sink whose backend fails (a full disk, a dead writer thread) raises from its next call,
within seconds and without blocking, and its ``close`` still releases what it can. Whoever writes to several
sinks (:class:`MultiSink`, the monitor) lets every sink have its call before raising the first error.

How to add another sink (MLflow, W&B)
-------------------------------------
Subclass :class:`Sink` and implement its five methods; import the backend's package in your module only.
A sketch for MLflow (not shipped)::

    import mlflow

    class MLflowSink(Sink):
        '''Writes scalars and hparams to an MLflow run; drops arrays.'''

        def __init__(self, run_name: str | None = None):
            self._run = mlflow.start_run(run_name=run_name)

        def write_scalars(self, step, scalars):
            mlflow.log_metrics({k: float(v) for k, v in scalars.items()}, step=check_step(step))

        def write_arrays(self, step, arrays):
            pass  # unsupported kind: dropped, as the class docstring says

        def write_hparams(self, hparams, metrics=None):
            mlflow.log_params(dict(hparams))
            if metrics:
                mlflow.log_metrics(dict(metrics))

        def flush(self):
            pass  # MLflow sends each call immediately

        def close(self):
            mlflow.end_run()

Test a new sink by writing a few steps and reading them back with the backend's own reader, as
``tests/sinks`` does for TensorBoard and HDF5.
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
