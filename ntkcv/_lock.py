"""Advisory file locks held by one process at a time: one writer per run directory and per HDF5 store.

A lock is an exclusive ``flock`` on a small file beside what it protects. The kernel releases it when its holder
exits, however it exits (``kill -9`` included), so a lock file left by a dead process is stale by construction and
the next process takes it at once. The holder writes its pid and purpose into the file, so a refused process can
say who holds it; the file is removed on release (a process that locked a file that was removed meanwhile notices
the changed inode and locks the new one). Not on Unix (no ``fcntl``) every lock is granted.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time

try:
    import fcntl
except ImportError:  # not on Unix
    fcntl = None


class LockedError(OSError):
    """Another live process holds the lock; ``holder`` says who (its pid, host and purpose)."""

    def __init__(self, message: str, holder: str):
        super().__init__(message)
        self.holder = holder


class FileLock:
    """An exclusive lock on ``path`` (created if absent); also a context manager that holds it for a block.

    Args:
      path: the lock file.
      purpose: said to a process that is refused (``"ntkcv train"``).
      timeout: how long :meth:`acquire` waits for another holder, in seconds (``None``: as long as it takes).
    """

    def __init__(self, path: str | os.PathLike, *, purpose: str, timeout: float | None = 0.0):
        self.path, self.purpose, self.timeout = os.fspath(path), purpose, timeout
        self._fd: int | None = None

    def acquire(self, *, poll: float = 0.05) -> None:
        """Take the lock, waiting at most ``timeout`` seconds.

        Raises:
          LockedError: another live process still holds it after ``timeout``; the message names the holder.
          OSError: the lock file cannot be created (a read-only directory, say).
        """
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 4096).decode(errors="replace").strip() or "a process that says nothing"
                os.close(fd)
                if deadline is not None and time.monotonic() >= deadline:
                    raise LockedError(f"{self.path} is held by {holder}", holder) from None
                time.sleep(poll)
                continue
            if not _same_file(fd, self.path):  # removed by its previous holder after we opened it: lock the new one
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}: {self.purpose}\n".encode())
            self._fd = fd
            return

    def release(self) -> None:
        """Remove the lock file and unlock it; does nothing if not held."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self._fd)  # closing the last descriptor releases the flock
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def _same_file(fd: int, path: str) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)
