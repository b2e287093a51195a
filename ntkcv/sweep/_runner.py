"""Running a sweep: each run in its own folder, resumable, locally in processes or as Ray tasks."""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import math
import multiprocessing
import os
import pathlib
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

from ntkcv._lock import FileLock
from ntkcv.config import RunConfig, to_dict
from ntkcv.sweep._spec import SweepConfig, SweepRun, expand
from ntkcv.sweep._table import flat_config, read_json, series_summary, summarise_run, write_json, write_table

DONE = ("complete", "diverged")  # a failed run is tried again by the next run_sweep
EXECUTORS = ("local", "ray")


def run_sweep(sweep: SweepConfig, sweep_dir: str | pathlib.Path | None = None, *, executor: str = "local",
              workers: int | None = None, progress: bool = True) -> pathlib.Path:
    """Train every run of ``sweep`` that is not done yet, then write the results table.

    Run ``r`` trains in ``sweep_dir/runs/<r.run_id>`` and is done once its ``result.json`` exists with
    status ``complete`` or ``diverged`` (final training loss not finite); done runs are skipped, so after
    a crash the same call carries on: a run with a checkpoint resumes from it, a run without one starts
    afresh (replacing its logs). A run that raises is recorded as ``failed`` with its error and tried again by
    the next call; the sweep goes on. ``sweep_dir/sweep.json`` holds the sweep and its run ids; ``results.csv`` (one row
    per finished run, see :func:`summarise_run`) is rewritten after each run, so it is valid at any time.

    Args:
      sweep: the sweep (see :func:`load_sweep`).
      sweep_dir: its folder (default: ``sweep.output_dir`` with ``{name}`` filled in). For Ray, it must be
        on a file system every node sees.
      executor: ``"local"``: a pool of ``spawn``-ed processes, at most ``workers`` (default
        ``sweep.workers``), the CPU count and available memory / ``sweep.memory_per_run_gb``; with one
        worker the runs train in this process. ``"ray"``: one Ray task per run (1 CPU,
        ``memory_per_run_gb``) on the cluster at ``RAY_ADDRESS``, else a local one; the cluster's resources
        bound the parallel runs.
      workers: overrides ``sweep.workers`` for the local executor.
      progress: show a progress bar over the runs (done/total, skipped, failed, diverged).

    Returns:
      the path of ``results.csv``.

    Raises:
      ValueError: a bad ``executor``/``workers``, or ``sweep_dir`` holds a run with the same id but a
        different config (from an edited sweep: choose another folder).
      ImportError: ``executor="ray"`` without ray installed.
    """
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {', '.join(map(repr, EXECUTORS))}, got {executor!r}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    ray = _import_ray() if executor == "ray" else None
    sweep_dir = pathlib.Path(sweep.output_dir.format(name=sweep.name) if sweep_dir is None else sweep_dir).resolve()
    runs = [_placed(run, sweep_dir) for run in expand(sweep)]
    (sweep_dir / "runs").mkdir(parents=True, exist_ok=True)
    for run in runs:
        _check_same_config(run)
    write_json(sweep_dir / "sweep.json", {"sweep": dataclasses.asdict(sweep), "run_ids": [run.run_id for run in runs],
                                          "overrides": {run.run_id: run.overrides for run in runs}})

    table = sweep_dir / "results.csv"
    rows: dict[str, dict[str, Any]] = {}
    pending = []
    for run in runs:
        result = read_json(_run_dir(run) / "result.json")
        if result is not None:
            rows[run.run_id] = summarise_run(_run_dir(run))
        if result is None or result.get("status") not in DONE:
            pending.append(run)
    write_table(table, (rows[run.run_id] for run in runs if run.run_id in rows))
    with _Progress(sweep.name, total=len(runs), skipped=len(runs) - len(pending), enabled=progress) as bar:
        if ray is not None:
            finished = _ray_runs(ray, pending, sweep.memory_per_run_gb)
        else:
            count = _worker_count(workers or sweep.workers, sweep.memory_per_run_gb)
            finished = _local_runs(pending, min(count, len(pending)))
        for run in finished:
            rows[run.run_id] = summarise_run(_run_dir(run))
            write_table(table, (rows[run.run_id] for run in runs if run.run_id in rows))
            bar.advance(run.run_id, rows[run.run_id]["status"])
    return table


def run_one(run_id: str, config: RunConfig, run_dir: str | pathlib.Path) -> str:
    """Trains one run in ``run_dir`` (resuming from its checkpoint if it has one), writes its ``result.json``
    and returns its status; a run already done (by a worker of an earlier, killed sweep) is left alone."""
    from ntkcv.train import train

    run_dir = pathlib.Path(run_dir)
    # a worker orphaned by a killed sweep may still run: wait for it
    with FileLock(run_dir.parent / f"{run_id}.lock", purpose=f"sweep run {run_id}", timeout=None):
        result = read_json(run_dir / "result.json")
        if result is not None and result.get("status") in DONE:
            return result["status"]
        started, error = time.perf_counter(), None
        try:  # from its latest checkpoint, or from its start (its earlier logs replaced) if it has none
            train(config, run_dir=run_dir, resume=True)
        except Exception as exception:  # recorded in the table; the sweep goes on
            error = f"{type(exception).__name__}: {exception}"
        return _record(run_id, run_dir, error, seconds=time.perf_counter() - started)


def _record(run_id: str, run_dir: pathlib.Path, error: str | None, *, seconds: float | None) -> str:
    """Writes ``result.json``; a run whose last training loss is not finite diverged (even if it then raised)."""
    final_loss = series_summary(run_dir / "ntkcv.h5").get("train.loss.final")
    if final_loss is not None and not math.isfinite(final_loss):
        status = "diverged"
    else:
        status = "failed" if error is not None else "complete"
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "result.json", {"run_id": run_id, "status": status, "error": error, "seconds": seconds})
    return status


def _local_runs(runs: Sequence[SweepRun], workers: int) -> Iterator[SweepRun]:
    if workers <= 1:
        for run in runs:
            run_one(run.run_id, run.config, str(_run_dir(run)))
            yield run
        return
    context = multiprocessing.get_context("spawn")  # JAX is not fork-safe
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_die_with_parent)
    try:
        with _single_threaded_workers():  # the pool spawns its processes at the first submits
            futures = {pool.submit(run_one, run.run_id, run.config, str(_run_dir(run))): run for run in runs}
        for future in concurrent.futures.as_completed(futures):
            run = futures[future]
            try:
                future.result()
            except Exception as exception:  # the worker process died (out of memory?)
                _record(run.run_id, _run_dir(run), f"worker process died: {type(exception).__name__}: {exception}",
                        seconds=None)
            yield run
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


_ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"}


@contextlib.contextmanager
def _single_threaded_workers() -> Iterator[None]:
    """BLAS and XLA limited to one thread in the processes started meanwhile (they inherit the environment;
    variables the user set win).

    Parallel runs that each start a thread pool per core slow each other down many times over (a 512×512
    SVD: 0.04 s alone, 0.9 s with two such runs on two cores). This process is not affected: its libraries
    read these variables when they were loaded.
    """
    saved = {key: os.environ.get(key) for key in _ONE_THREAD}
    os.environ.update({key: os.environ.get(key) or value for key, value in _ONE_THREAD.items()})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as error:
        raise ImportError('the Ray executor needs ray: pip install "ntkcv[ray]"') from error
    return ray


def _ray_runs(ray: Any, runs: Sequence[SweepRun], memory_per_run_gb: float) -> Iterator[SweepRun]:
    started = not ray.is_initialized()
    if started:
        ray.init()  # connects to RAY_ADDRESS if set, else starts a local cluster
    try:
        task = ray.remote(num_cpus=1, memory=int(memory_per_run_gb * 2**30), max_retries=0)(run_one)
        refs = {task.remote(run.run_id, run.config, str(_run_dir(run))): run for run in runs}
        remaining = list(refs)
        while remaining:
            (ref,), remaining = ray.wait(remaining, num_returns=1)
            run = refs[ref]
            try:
                ray.get(ref)
            except Exception as exception:  # the task's worker died (out of memory?)
                _record(run.run_id, _run_dir(run), f"Ray task died: {type(exception).__name__}: {exception}",
                        seconds=None)
            yield run
    finally:
        if started:
            ray.shutdown()


def _worker_count(workers: int, memory_per_run_gb: float, *, cpus: int | None = None,
                  available_gb: float | None = None) -> int:
    """``workers`` bounded by the CPUs and by available memory / ``memory_per_run_gb``; at least 1."""
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if available_gb is None:
        available_gb = _available_memory_gb()
    by_memory = math.floor(available_gb / memory_per_run_gb) if available_gb is not None else workers
    return max(1, min(workers, cpus, by_memory))


def _available_memory_gb() -> float | None:
    """MemAvailable from /proc/meminfo (Linux), else free physical pages via sysconf, else None."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    return None


def _die_with_parent() -> None:
    """Pool initializer: on Linux the kernel kills the worker when the sweep's process dies, even by SIGKILL."""
    if sys.platform.startswith("linux"):
        import ctypes

        parent = os.getppid()
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl
            os._exit(1)


def _placed(run: SweepRun, sweep_dir: pathlib.Path) -> SweepRun:
    output = dataclasses.replace(run.config.output, dir=str(sweep_dir / "runs" / run.run_id))
    return dataclasses.replace(run, config=dataclasses.replace(run.config, output=output))


def _run_dir(run: SweepRun) -> pathlib.Path:
    return pathlib.Path(run.config.output.dir)


def _check_same_config(run: SweepRun) -> None:
    stored = read_json(_run_dir(run) / "config.json")
    if stored is None:
        return
    stored, expected = flat_config(stored), flat_config(json.loads(json.dumps(to_dict(run.config))))
    differ = next((key for key in expected if stored.get(key) != expected[key]), None)
    if differ is not None:
        raise ValueError(f"{_run_dir(run)} holds run {run.run_id} with another config ({differ} was "
                         f"{stored.get(differ)!r}, now {expected[differ]!r}): the sweep was edited since; "
                         "pass another sweep folder")


class _Progress:
    """A rich progress bar over the runs on a terminal; one line per finished run elsewhere; or nothing."""

    def __init__(self, name: str, *, total: int, skipped: int, enabled: bool):
        self.name, self.total, self.enabled = name, total, enabled
        self.counts = {"skipped": skipped, "failed": 0, "diverged": 0}
        self.done = skipped
        self._bar = None

    def __enter__(self) -> _Progress:
        if not self.enabled:
            return self
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        console = Console()
        if console.is_terminal:
            self._bar = Progress(TextColumn(f"sweep {self.name}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("{task.fields[counts]}"), console=console)
            self._bar.start()
            self._task = self._bar.add_task("runs", total=self.total, completed=self.done, counts=self._counts())
        else:
            print(f"sweep {self.name}: {self.done}/{self.total} runs done ({self._counts()})", flush=True)
        return self

    def advance(self, run_id: str, status: str) -> None:
        self.done += 1
        if status in self.counts:
            self.counts[status] += 1
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, counts=self._counts())
        elif self.enabled:
            print(f"sweep {self.name}: {self.done}/{self.total} {run_id} {status} ({self._counts()})", flush=True)

    def __exit__(self, *exc_info: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def _counts(self) -> str:
        return "  ".join(f"{name} {count}" for name, count in self.counts.items())
