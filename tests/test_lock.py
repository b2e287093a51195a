"""The advisory file lock behind one writer per run directory and per HDF5 store."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from ntkcv._lock import FileLock, LockedError

HOLDER = """
import sys, time
from ntkcv._lock import FileLock
lock = FileLock(sys.argv[1], purpose="test holder")
lock.acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_a_second_holder_is_refused_with_the_holders_name_and_the_file_goes_on_release(tmp_path):
    path = tmp_path / "run.lock"
    first = FileLock(path, purpose="first writer")
    first.acquire()
    assert first.held and path.is_file()
    with pytest.raises(LockedError, match=rf"pid {os.getpid()} .*: first writer") as refused:
        FileLock(path, purpose="second writer").acquire()
    assert "first writer" in refused.value.holder
    first.release()
    assert not path.exists() and not first.held
    with FileLock(path, purpose="third writer") as third:
        assert third.held
    assert not path.exists()


def test_a_waiting_holder_gets_the_lock_once_it_is_released(tmp_path):
    path = tmp_path / "run.lock"
    first = FileLock(path, purpose="first")
    first.acquire()
    threading.Timer(0.3, first.release).start()
    started = time.monotonic()
    second = FileLock(path, purpose="second", timeout=10)
    second.acquire()
    assert 0.25 < time.monotonic() - started < 5
    assert path.read_text().startswith(f"pid {os.getpid()} ") and path.read_text().strip().endswith("second")
    second.release()


def test_the_lock_of_a_killed_process_is_free_at_once(tmp_path):
    path = tmp_path / "run.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockedError, match=f"pid {holder.pid} .*test holder"):
            FileLock(path, purpose="me").acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert path.is_file()  # left behind by the killed holder: stale
    with FileLock(path, purpose="me") as lock:
        assert lock.held
