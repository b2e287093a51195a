"""The monitor's host side: runs firings (now, later or in a background thread, always in order), fetches their
results and writes them with the training loop's scalars to the sinks, through one fan-out policy."""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from ntkcv.sinks.base import MultiSink, call_all

#: A firing: computes and fetches (to the host) one step's measured scalars and arrays.
Firing = Callable[[], tuple[dict[str, Any], dict[str, Any]]]


@functools.cache
def _blas_libraries() -> Any:
    """The BLAS/LAPACK libraries loaded in this process (a ``threadpoolctl.ThreadpoolController``), among them
    the LAPACK that XLA's CPU eigendecompositions call: jaxlib takes it from SciPy, which is loaded first."""
    import scipy.linalg  # noqa: F401
    import threadpoolctl

    return threadpoolctl.ThreadpoolController()


class Recorder:
    """Runs the monitor's firings and writes what they measured, with the loop's own scalars, to the sinks.

    A firing is a function that computes one step's measurements and fetches them to the host (one
    ``jax.device_get``). :meth:`fire` runs it at once, or with ``asynchronous`` in a background thread: the caller
    returns at once and the results are written, with their own step, at a later :meth:`record`, :meth:`flush` or
    :meth:`close`; at most ``max_pending`` firings wait, one more waits for the oldest. :meth:`hand_over` is for
    callers that must not compute or write now (inside a JAX host callback): the firing runs in the background
    thread, or else at the next :meth:`record`, :meth:`flush` or :meth:`close`. Firings run in the order they came.

    Writing goes through one :class:`~ntkcv.sinks.MultiSink` over :attr:`sinks` (a list: a sink appended later
    receives what is written from then on): every sink gets every step even when one raises, and the first error
    is raised after; non-finite measured values (names starting ``cv/``) are written as NaN with a warning. Under
    ``jax.distributed`` only process 0 writes: the others return what they would have written, and write nothing. A
    firing that raised raises at the next :meth:`record`, :meth:`flush` or :meth:`close`, after everything else
    was written.

    Args:
      sinks: the sinks.
      asynchronous: run firings in a background thread.
      max_pending: firings that may wait in the background.
      blas_threads: threads of the BLAS/LAPACK libraries (OpenBLAS, MKL, via ``threadpoolctl``) while a firing runs
        (in the background: from its start until its results are written), restored after it; they run the CPU
        eigendecomposition, whose idle OpenBLAS threads otherwise busy-wait on the cores the training loop needs.
        ``None`` leaves the libraries' setting.
    """

    def __init__(self, sinks: Sequence[Any] = (), *, asynchronous: bool = False, max_pending: int = 2,
                 blas_threads: int | None = 1):
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, got {max_pending}")
        if blas_threads is not None and blas_threads < 1:
            raise ValueError(f"blas_threads must be at least 1 or None, got {blas_threads!r}")
        self.sinks = list(sinks)
        self.max_pending, self.blas_threads = max_pending, blas_threads
        self.latest: dict[str, float] = {}  # the newest value written under each name
        self._worker = concurrent.futures.ThreadPoolExecutor(1, "ntkcv-monitor") if asynchronous else None
        self._pending: collections.deque = collections.deque()  # (step, future or deferred firing), in order
        self._held, self._limit = 0, None  # firings holding the BLAS limit, and the limit
        self._closed = False

    @property
    def asynchronous(self) -> bool:
        return self._worker is not None

    def prepare(self, work: Callable[[], Any]) -> None:
        """Run ``work`` (a compilation ahead of the first firing) in the background thread; nothing when synchronous."""
        if self._worker is not None:
            self._worker.submit(work)

    def fire(self, step: int, firing: Firing) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """Run ``firing`` now and return its results (synchronous), or in the background and return None."""
        self._check_open()
        if self._worker is None:
            call_all([functools.partial(self._drain, wait=True)])  # earlier handed-over firings first
            return self._run(firing)
        self._submit(step, firing)
        return None

    def hand_over(self, step: int, firing: Firing) -> None:
        """Queue ``firing``: in the background thread, or (synchronous) for the next record, flush or close."""
        self._check_open()
        if self._worker is None:
            self._pending.append((step, firing))
        else:
            self._submit(step, firing)

    def record(self, step: int, scalars: dict[str, Any], arrays: dict[str, Any] | None = None) -> dict[str, float]:
        """Write the finished firings, then ``scalars`` and ``arrays`` at ``step``; returns what was written."""
        self._check_open()
        drained, current = call_all([functools.partial(self._drain, wait=False),
                                     functools.partial(self._write, step, jax.device_get(scalars), arrays or {})])
        return {**drained, **current}

    def flush(self) -> None:
        """Run and write every pending firing, then flush every sink."""
        self._check_open()
        call_all([functools.partial(self._drain, wait=True), MultiSink(self.sinks).flush])

    def close(self) -> None:
        """Write pending firings, stop the background thread and close the sinks, each also when an earlier one
        raised (the first error is raised after); closing again does nothing."""
        if self._closed:
            return
        self._closed = True
        closing = [functools.partial(self._drain, wait=True)]
        if self._worker is not None:
            closing.append(self._worker.shutdown)
        call_all([*closing, MultiSink(self.sinks).close])

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("the NTKMonitor is closed: make a new one to record more")

    def _submit(self, step: int, firing: Firing) -> None:
        if len(self._pending) >= self.max_pending:
            concurrent.futures.wait([self._pending[0][1]])
        self._hold_blas_limit()  # released when its results are written
        self._pending.append((step, self._worker.submit(firing)))

    def _run(self, firing: Firing) -> tuple[dict[str, Any], dict[str, Any]]:
        self._hold_blas_limit()
        try:
            return firing()
        finally:
            self._release_blas_limit()

    def _hold_blas_limit(self) -> None:
        """Limit the BLAS threads until the matching release (holds nest). The thread that fires sets it, also for a
        background firing: OpenBLAS ignores a limit set by another thread once this one has set one."""
        if self.blas_threads is not None:
            if not self._held:
                self._limit = _blas_libraries().limit(limits=self.blas_threads, user_api="blas")
            self._held += 1

    def _release_blas_limit(self) -> None:
        if self.blas_threads is not None:
            self._held -= 1
            if not self._held:
                self._limit.restore_original_limits()

    def _drain(self, *, wait: bool) -> dict[str, float]:
        """Write the results of finished firings (all of them with ``wait``; deferred ones run now), oldest first;
        one that failed is raised after the others were written."""
        finished = []
        while self._pending and (wait or _ready(self._pending[0][1])):
            finished.append(self._pending.popleft())
        written = call_all([functools.partial(self._write_result, step, work) for step, work in finished])
        return {name: value for values in written for name, value in values.items()}

    def _write_result(self, step: int, work: concurrent.futures.Future | Firing) -> dict[str, float]:
        if isinstance(work, concurrent.futures.Future):
            try:
                scalars, arrays = work.result()
            finally:
                self._release_blas_limit()
        else:
            scalars, arrays = self._run(work)
        return self._write(step, scalars, arrays)

    def _write(self, step: int, scalars: dict[str, Any], arrays: dict[str, Any]) -> dict[str, float]:
        scalars = {name: float(np.asarray(value)) for name, value in scalars.items()}
        bad = sorted(name for name, value in scalars.items() if name.startswith("cv/") and not np.isfinite(value))
        if bad:
            warnings.warn(f"step {step}: non-finite collective variables {bad} logged as NaN", RuntimeWarning,
                          stacklevel=5)  # the caller of a synchronous monitor (through record and call_all)
            scalars.update({name: float("nan") for name in bad})
        arrays = {name: np.asarray(array) for name, array in arrays.items()}
        self.latest.update(scalars)
        sinks, writes = MultiSink(self.sinks if jax.process_index() == 0 else ()), []
        if scalars:
            writes.append(functools.partial(sinks.write_scalars, step, scalars))
        if arrays:
            writes.append(functools.partial(sinks.write_arrays, step, arrays))
        call_all(writes)
        return scalars


def _ready(work: concurrent.futures.Future | Firing) -> bool:
    """A background firing that finished, or a deferred one (it runs when drained)."""
    return not isinstance(work, concurrent.futures.Future) or work.done()
