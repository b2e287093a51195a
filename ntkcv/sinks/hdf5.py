"""HDF5 sink, via h5py (imported only here)."""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import os
import time
from collections.abc import Iterator, Mapping
from typing import Any

import h5py
import numpy as np

from ntkcv._lock import FileLock, LockedError
from ntkcv.sinks._superblock import clear_write_flags
from ntkcv.sinks.base import Sink, check_step

_RESERVED = ("step", "value", "shape")


class HDF5Sink(Sink):
    """Appends scalars and arrays to an HDF5 file that can be read while it is written.

    Layout (every dataset resizable along its first axis, chunked)::

        /scalars/<name>/step    int64   (rows,)          training step of each row
        /scalars/<name>/value   float64 (rows,)
        /arrays/<name>/step     int64   (rows,)
        /arrays/<name>/value    float   (rows, *max_shape)  NaN-padded to the largest array so far
        /arrays/<name>/shape    int64   (rows, ndim)     each row's true shape
        /hparams                group; one attribute per hyper-parameter (non-scalars stored as str)
        /hparam_metrics         group; one attribute per metric given to ``write_hparams``
        attributes of /: ``ntkcv_version``, ``created`` (ISO 8601, first session), ``opened`` (this session)

    Each name has its own ``step`` dataset, so names written on different schedules (the loss every
    step, the CVs every 50) stay explicit. A name with ``/`` nests groups (``scalars/cv/entropy/value``).
    Arrays keep a floating dtype (others become float64) and one rank per name; a differently sized
    array widens the dataset, older rows padded with NaN. Nothing is dropped.

    Buffering: scalars and arrays are kept in memory and appended, one resize per name, at :meth:`flush`,
    which runs by itself every ``flush_secs``, when the buffered arrays exceed ``max_buffer_bytes``, and at
    :meth:`close` (a row per call and an HDF5 flush per step cost about 0.5 ms, a sixth of a small model's
    training step; a spectrum written at once about 3 ms).

    Concurrent reading: with ``swmr=True`` the file enters HDF5's single-writer/multiple-reader mode at
    the first write of a step after this session's first step, and every flush reaches the file, so readers
    can open it with ``h5py.File(path, "r", libver="latest", swmr=True)`` and ``refresh()`` datasets. SWMR
    forbids creating objects, so a name first seen later, or ``write_hparams`` after that point, makes
    the sink reopen the file; readers should then reopen it to see the new name.

    One writer: the sink holds a lock (the file ``<path>.lock``, removed on :meth:`close`) for its life, so a
    second sink on the same file, in this process or another, is refused with :class:`ntkcv._lock.LockedError`
    (an ``OSError``) after waiting ``lock_timeout`` seconds for the holder; the lock of a process that died is
    free at once. A file whose writer died (killed during SWMR writing, which leaves HDF5's "open for write" mark
    that makes plain ``h5py.File(path, "r")`` fail) is repaired in place on opening: the mark is cleared, every
    flushed row kept (see :func:`open_store` for readers).

    Resuming: an existing file is appended to. Pass ``resume_from_step=s`` when a run restarts from a
    checkpoint at step ``s``: rows with step ``>= s`` are deleted first, so the resumed run leaves no
    duplicate and no missing step (``resume_from_step=0`` empties the file).

    Args:
      path: the file; created if absent.
      resume_from_step: delete rows with ``step >= resume_from_step`` on opening.
      swmr: allow readers while writing (needs HDF5 >= 1.10 files, ``libver="latest"``).
      flush_secs: longest time buffered rows wait before reaching the file (``0``: every call).
      max_buffer_bytes: buffered arrays beyond this size are written at once.
      lock_timeout: how long to wait for another holder of the file's lock (a reader of ``open_store``
        holds it for a moment).
    """

    def __init__(self, path: str | os.PathLike, *, resume_from_step: int | None = None, swmr: bool = True,
                 flush_secs: float = 10.0, max_buffer_bytes: int = 64 * 2**20, lock_timeout: float = 5.0):
        if resume_from_step is not None:
            resume_from_step = check_step(resume_from_step)
        self.path = os.fspath(path)
        self.swmr = swmr
        self.flush_secs, self.max_buffer_bytes = flush_secs, max_buffer_bytes
        self._buffer: dict[str, tuple[list[int], list[float]]] = {}  # name -> (steps, values) not yet written
        self._arrays: dict[str, list[tuple[int, np.ndarray]]] = {}  # name -> (step, array) rows not yet written
        self._array_ranks: dict[str, int] = {}
        self._buffered_bytes = 0
        self._flushed_at = time.monotonic()
        self._first_step: int | None = None
        self._lock = FileLock(_lock_path(self.path), purpose=f"HDF5Sink({self.path!r})", timeout=lock_timeout)
        try:
            self._lock.acquire()
        except LockedError as error:
            raise LockedError(f"HDF5Sink: {self.path} is being written by another process ({error.holder}); "
                              "one writer at a time: wait for it to finish or write elsewhere", error.holder) from None
        try:
            self._file = _open_for_writing(self.path)
        except BaseException:
            self._lock.release()
            raise
        now = datetime.datetime.now(datetime.UTC).isoformat()
        self._file.attrs["ntkcv_version"] = importlib.metadata.version("ntkcv")
        self._file.attrs.setdefault("created", now)
        self._file.attrs["opened"] = now
        if resume_from_step is not None:
            for group in _step_groups(self._file):
                _truncate(group, resume_from_step)
        self._file.flush()

    @property
    def file(self) -> h5py.File:
        """The open ``h5py.File``; raises once the sink is closed."""
        if self._file is None:
            raise ValueError(f"HDF5Sink({self.path!r}) is closed")
        return self._file

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        step = self._begin(step)
        for name, value in scalars.items():
            self._check_name("scalar", name)
            steps, values = self._buffer.setdefault(name, ([], []))
            steps.append(step)
            values.append(float(value))
        if time.monotonic() - self._flushed_at >= self.flush_secs:
            self.flush()

    def write_arrays(self, step: int, arrays: Mapping[str, np.ndarray]) -> None:
        step = self._begin(step)
        for name, array in arrays.items():
            self._check_name("array", name)
            array = np.array(array)  # a copy: the caller may reuse its buffer before the flush
            if not np.issubdtype(array.dtype, np.floating):
                array = array.astype(np.float64)
            rank = self._array_ranks.get(name)
            if rank is None:
                stored = self.file.get(f"arrays/{name}/value")
                rank = self._array_ranks[name] = array.ndim if stored is None else stored.ndim - 1
            if rank != array.ndim:
                raise ValueError(f"array {name!r} has {rank} dimensions in {self.path}, got shape {array.shape}")
            self._arrays.setdefault(name, []).append((step, array))
            self._buffered_bytes += array.nbytes
        if time.monotonic() - self._flushed_at >= self.flush_secs or self._buffered_bytes > self.max_buffer_bytes:
            self.flush()

    def write_hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float] | None = None) -> None:
        self._reopen_if_swmr()
        for group_name, values in (("hparams", hparams), ("hparam_metrics", metrics or {})):
            group = self.file.require_group(group_name)
            for name, value in values.items():
                group.attrs[name] = _attribute_value(value)
        self.file.flush()

    def flush(self) -> None:
        """Append the buffered scalars and arrays and flush the file."""
        if self._file is None:
            return
        for name, (steps, values) in self._buffer.items():
            group = self._group("scalars", name, lambda g: _create_scalar(g))
            _append_rows(group, step=np.asarray(steps, np.int64), value=np.asarray(values, np.float64))
        self._buffer.clear()
        for name, rows in self._arrays.items():
            self._append_arrays(name, rows)
        self._arrays.clear()
        self._buffered_bytes = 0
        self._file.flush()
        self._flushed_at = time.monotonic()

    def close(self) -> None:
        if self._file is None:
            return
        try:
            self.flush()
        finally:
            self._file.close()
            self._file = None
            self._lock.release()

    def _append_arrays(self, name: str, rows: list[tuple[int, np.ndarray]]) -> None:
        """Append ``rows`` of one name, NaN-padded to the widest shape so far (older rows padded by resizing)."""
        group = self._group("arrays", name, lambda g: _create_array(g, rows[0][1]))
        value = group["value"]
        widest = tuple(max(sizes) for sizes in zip(value.shape[1:], *(a.shape for _, a in rows), strict=True))
        if widest != value.shape[1:]:
            value.resize((value.shape[0], *widest))  # fillvalue NaN pads the older rows
        padded = np.full((len(rows), *widest), np.nan, dtype=value.dtype)
        for row, (_, array) in enumerate(rows):
            padded[(row, *(slice(0, n) for n in array.shape))] = array
        _append_rows(group, step=np.asarray([step for step, _ in rows], np.int64), value=padded,
                     shape=np.asarray([a.shape for _, a in rows], np.int64).reshape(len(rows), -1))

    def _begin(self, step: int) -> int:
        """Validates ``step`` and enters SWMR mode once this session's first step is complete."""
        step = check_step(step)
        if self._first_step is None:
            self._first_step = step
        elif self.swmr and step != self._first_step and not self.file.swmr_mode:
            self.file.swmr_mode = True
        return step

    @staticmethod
    def _check_name(kind: str, name: str) -> None:
        if not name or name.split("/")[-1] in _RESERVED:
            raise ValueError(f"{kind} name must be non-empty and must not end in one of {_RESERVED}, got {name!r}")

    def _group(self, kind: str, name: str, create) -> h5py.Group:
        self._check_name(kind[:-1], name)
        path = f"{kind}/{name}"
        group = self.file.get(path)
        if not isinstance(group, h5py.Group) or "step" not in group:
            swmr = self._reopen_if_swmr()
            group = self.file.require_group(path)
            create(group)
            if swmr:
                self.file.swmr_mode = True
        return group

    def _reopen_if_swmr(self) -> bool:
        """Leaves SWMR mode (to create objects) by reopening; returns whether it did."""
        if not self.file.swmr_mode:
            return False
        self.file.close()
        # SWMR readers hold a shared lock that would refuse a plain writer; SWMR keeps them consistent.
        self._file = h5py.File(self.path, "a", libver="latest", locking=False)
        return True


def _create_scalar(group: h5py.Group) -> None:
    group.create_dataset("step", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(1024,))
    group.create_dataset("value", shape=(0,), maxshape=(None,), dtype=np.float64, chunks=(1024,))


def _create_array(group: h5py.Group, array: np.ndarray) -> None:
    group.create_dataset("step", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(256,))
    group.create_dataset("shape", shape=(0, array.ndim), maxshape=(None, array.ndim), dtype=np.int64,
                         chunks=(256, max(array.ndim, 1)))
    group.create_dataset("value", shape=(0, *array.shape), maxshape=(None,) * (array.ndim + 1),
                         dtype=array.dtype, chunks=True, fillvalue=np.nan)


def _append_rows(group: h5py.Group, **columns: np.ndarray) -> None:
    """Append the rows of ``columns`` (equal first axes) to the group's datasets of those names."""
    rows, added = group["step"].shape[0], len(columns["step"])
    for name, value in columns.items():
        dataset = group[name]
        dataset.resize(rows + added, axis=0)
        dataset[rows:] = value


def _lock_path(path: str) -> str:
    return f"{path}.lock"


def _open_for_writing(path: str) -> h5py.File:
    """Open ``path`` for appending (the caller holds its lock, so any earlier writer is dead): a file left marked
    "open for write" by a killed SWMR writer is repaired in place first, keeping every flushed row."""
    if os.path.isfile(path):
        clear_write_flags(path)
    try:
        return h5py.File(path, "a", libver="latest")
    except OSError as error:
        raise OSError(f"cannot open the HDF5 store {path} for writing: {error}") from error


@contextlib.contextmanager
def open_store(path: str | os.PathLike) -> Iterator[h5py.File]:
    """Open an HDF5 store written by :class:`HDF5Sink` for reading, never hanging on a damaged file.

    While a sink writes it (its lock is held by a live process) the file is opened as a SWMR reader, which sees
    every flushed row. Otherwise this holds the lock while reading, repairs a file whose writer died (see
    :class:`HDF5Sink`), and opens it plainly read-only, so a truncated or damaged file is an ``OSError`` at once
    (a SWMR reader retries its reads of such a file for a very long time). Without write access to the folder
    or the file, the file is read as it is.

    Raises:
      OSError: the file is missing, truncated or not HDF5; the message names it.
    """
    path = os.fspath(path)
    lock = FileLock(_lock_path(path), purpose="ntkcv reader")
    try:
        lock.acquire()
    except LockedError:
        pass  # a live writer: read as a SWMR reader
    except OSError:
        lock = None  # a folder we cannot write to: no repair
    try:
        if lock is not None and lock.held:
            with contextlib.suppress(PermissionError):
                clear_write_flags(path)
        with _open_for_reading(path, swmr=lock is not None and not lock.held) as file:
            yield file
    finally:
        if lock is not None:
            lock.release()


def _open_for_reading(path: str, *, swmr: bool) -> h5py.File:
    try:
        try:
            return h5py.File(path, "r", libver="latest", swmr=True) if swmr else h5py.File(path, "r")
        except OSError as error:  # a crashed writer's mark we could not clear: its data is intact for SWMR
            if swmr or "already open for write" not in str(error):
                raise
            return h5py.File(path, "r", libver="latest", swmr=True)
    except OSError as error:
        raise OSError(f"cannot read the HDF5 store {path}: {error}") from error


def _step_groups(file: h5py.File) -> list[h5py.Group]:
    groups = []
    for kind in ("scalars", "arrays"):
        if kind in file:
            file[kind].visititems(lambda _, obj: groups.append(obj)
                                  if isinstance(obj, h5py.Group) and "step" in obj else None)
    return groups


def _truncate(group: h5py.Group, step: int) -> None:
    """Deletes the rows of ``group``'s datasets whose step is ``>= step``."""
    keep = np.flatnonzero(group["step"][:] < step)
    if keep.size == group["step"].shape[0]:
        return
    prefix = np.array_equal(keep, np.arange(keep.size))
    for name in ("step", "value", "shape"):
        if name in group:
            dataset = group[name]
            kept = None if prefix else dataset[keep]
            dataset.resize(keep.size, axis=0)
            if kept is not None and keep.size:
                dataset[...] = kept


def _attribute_value(value: Any) -> Any:
    """Numbers, bools, strings and numeric arrays as they are; anything else (None, dicts) as its ``str``."""
    if isinstance(value, bool | int | float | str | np.generic):
        return value
    array = np.asarray(value) if isinstance(value, list | tuple | np.ndarray) else None
    if array is not None and array.dtype.kind in "biuf":
        return array
    return str(value)
