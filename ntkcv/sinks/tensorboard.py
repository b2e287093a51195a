"""TensorBoard sink, via tensorboardX (imported only here)."""

from __future__ import annotations

import errno
import numbers
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import tensorboardX
from tensorboardX.summary import hparams as hparams_summaries

from ntkcv.sinks.base import Sink, check_step, histogram_values

#: Charts on the "ntkcv" custom-scalars page: chart title -> regexes of the scalar tags it overlays.
DEFAULT_LAYOUT: Mapping[str, Sequence[str]] = {
    "entropy (train and test probes)": ["^cv/([^/]+/)?entropy$", "^cv/([^/]+/)?effective_entropy$"],
    "trace": ["^cv/([^/]+/)?trace$"],
    "drift from the first kernel": ["^cv/([^/]+/)?relative_distance$", "^cv/([^/]+/)?cosine_distance$"],
    "kernel velocity": ["^cv/([^/]+/)?kernel_velocity$"],
    "loss": ["^train/loss$", "^train/test_loss$"],
}


class TensorBoardSink(Sink):
    """Writes TensorBoard event files into one run directory.

    Scalars go under the names given; each array becomes a histogram (non-finite entries are left out, an
    array with none finite is dropped). A spectrum (an array named ``…spectrum``) becomes the histogram
    ``…spectrum_log10`` of the log10 of its positive eigenvalues; the HDF5 store keeps the raw values.
    Hyper-parameters are written into the same run directory (tensorboardX's ``add_hparams`` would make a
    sub-run); their ``metrics`` are also written as scalars at the latest step seen, so the HParams dashboard
    can show them. Nothing is dropped otherwise.

    tensorboardX writes the event file from a thread of its own. If that fails (a full disk), the sink keeps the
    error and raises it as an ``OSError`` naming the run directory and the cause from every later write and
    flush, and from ``close`` unless an earlier call raised it; it never blocks on the dead writer, and
    ``close`` still stops the thread and closes the file. The events after the failure are lost.

    Args:
      logdir: the run directory.
      purge_step: when resuming from step ``s``, pass ``purge_step=s``: TensorBoard then hides the events
        of earlier sessions with step ``>= s``, so a step written again shows once.
      flush_secs: flush pending events to disk at least this often (and on ``flush``/``close``).
      max_queue: flush once this many events are pending.
      layout: the custom-scalars page "ntkcv" as chart title -> tag regexes (default: entropy, trace and
        loss); ``None`` writes no layout.
      bins: histogram bins, as for ``SummaryWriter.add_histogram`` (``"tensorflow"``: exponential bins
        that suit spectra over many orders of magnitude).

    Example::

        with TensorBoardSink("runs/mlp", purge_step=resume_step) as sink:
            sink.write_scalars(step, {"train/loss": 0.3, "cv/entropy": 2.1})
    """

    def __init__(
        self,
        logdir: str,
        *,
        purge_step: int | None = None,
        flush_secs: float = 30,
        max_queue: int = 10,
        layout: Mapping[str, Sequence[str]] | None = DEFAULT_LAYOUT,
        bins: str = "tensorflow",
    ):
        if purge_step is not None:
            purge_step = check_step(purge_step)
        if not flush_secs > 0:
            raise ValueError(f"flush_secs must be positive, got {flush_secs!r}")
        self.logdir = str(logdir)
        self.bins = bins
        self._last_step = 0 if purge_step is None else purge_step
        self._writer: tensorboardX.SummaryWriter | None = tensorboardX.SummaryWriter(
            self.logdir, purge_step=purge_step, flush_secs=flush_secs, max_queue=max_queue,
            # tensorboardX names event files by the second: a unique, time-ordered suffix keeps a quick
            # resume from overwriting the previous session's file.
            filename_suffix=f".{time.time_ns()}")
        self._events = self._writer.file_writer.event_writer  # its queue, writer thread and event file
        events_file = self._events._ev_writer
        self._file = events_file._py_recordio_writer = _KeptErrors(events_file._py_recordio_writer)
        self._raised = False  # whether the backend's failure was raised to the caller
        if layout is not None:
            charts = {title: ["Multiline", list(tags)] for title, tags in layout.items()}
            self._writer.add_custom_scalars({"ntkcv": charts})

    @property
    def writer(self) -> tensorboardX.SummaryWriter:
        """The underlying ``SummaryWriter``; raises once the sink is closed or its backend failed."""
        if self._writer is None:
            raise ValueError(f"TensorBoardSink({self.logdir!r}) is closed")
        self._check()
        return self._writer

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        step = self._see(step)
        for name, value in scalars.items():
            self.writer.add_scalar(name, float(value), step)

    def write_arrays(self, step: int, arrays: Mapping[str, np.ndarray]) -> None:
        step = self._see(step)
        for name, values in histogram_values(arrays).items():
            self.writer.add_histogram(name, values, step, bins=self.bins)

    def write_hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float] | None = None) -> None:
        metrics = dict(metrics or {})
        hparams = {name: _hparam_value(value) for name, value in hparams.items() if value is not None}
        file_writer = self.writer.file_writer
        for summary in hparams_summaries(hparams, metrics):  # experiment, session start, session end
            file_writer.add_summary(summary, self._last_step)
        for name, value in metrics.items():
            self.writer.add_scalar(name, float(value), self._last_step)

    def flush(self) -> None:
        if self._writer is not None:
            self._check()
            _drain(self._events)
            self._writer.flush()
            self._check()

    def close(self) -> None:
        if self._writer is None:
            return
        writer, self._writer = self._writer, None
        cause = self._cause()
        if not self._events._worker.is_alive():  # a new thread empties the queue, so that closing does not block
            _start_worker(self._events)
        writer.close()  # writes what it can (nothing after a failure), stops the thread, closes the file
        if not self._raised:
            self._check(cause)

    def _check(self, cause: Exception | None = None) -> None:
        """Raises an ``OSError`` naming the run directory and the cause if the backend failed (or ``cause``)."""
        cause = cause or self._cause()
        if cause is not None:
            self._raised = True
            reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause)
            raise OSError(getattr(cause, "errno", None) or errno.EIO,
                          f"cannot write TensorBoard events to {self.logdir}: {reason}") from cause

    def _cause(self) -> Exception | None:
        """Why the backend failed: the event file's first error, or tensorboardX's writer thread stopped."""
        worker = self._events._worker
        if self._file.error is None and worker is not None and not worker.is_alive():
            return RuntimeError("tensorboardX's writer thread stopped")
        return self._file.error

    def _see(self, step: int) -> int:
        step = check_step(step)
        self._last_step = max(self._last_step, step)
        return step


class _KeptErrors:
    """tensorboardX's event file (a ``RecordWriter``) that keeps its first error instead of raising it.

    Installed under tensorboardX's ``EventsWriter``, whose lock serialises these calls: an error no longer kills the
    writer thread, which keeps emptying its queue (so a put never blocks), and the sink raises the kept error. Once
    a write or flush failed, the file may end in a partial record: later writes and flushes are dropped; ``close``
    still closes it.
    """

    def __init__(self, record_writer: Any):
        self._file = record_writer
        self.error: Exception | None = None

    def write(self, data: bytes) -> None:
        if self.error is None:
            self._keep_error(self._file.write, data)

    def flush(self) -> None:
        if self.error is None:
            self._keep_error(self._file.flush)

    def close(self) -> None:
        self._keep_error(self._file.close)

    def _keep_error(self, method: Callable[..., object], *args: Any) -> None:
        try:
            method(*args)
        except Exception as error:  # raised by the sink, in the training thread
            self.error = self.error or error


def _drain(event_writer: Any) -> None:
    """Writes out the events still queued for tensorboardX's writer thread.

    tensorboardX's ``flush`` only flushes the file, not the queue its thread consumes, so without this
    the latest events would appear up to ``flush_secs`` later. Stopping the thread drains the queue
    (first in, first out); a new thread then takes over.
    """
    event_writer._worker.stop()
    _start_worker(event_writer)


def _start_worker(event_writer: Any) -> None:
    """Starts a new tensorboardX writer thread on the queue and event file of ``event_writer``."""
    worker = event_writer._worker
    event_writer._worker = type(worker)(event_writer._event_queue, event_writer._ev_writer, event_writer._flush_secs)
    event_writer._worker.start()


def _hparam_value(value: Any) -> bool | int | float | str:
    """What the HParams plugin can show: bools, numbers and strings; anything else as its ``str``."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool | str) or (isinstance(value, numbers.Real)):
        return value
    return str(value)
