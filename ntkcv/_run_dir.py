"""A run directory's admission: one writer at a time, no rerun over an old run, a resume only of the same run.

``ntkcv train`` claims its ``output.dir`` before it writes anything there: it takes the directory's lock
(``ntkcv.lock``, held until the run ends; a second ``ntkcv train`` or ``--resume`` on the directory is refused
while the first lives), refuses a directory that already holds a run unless resuming, checks that a resumed run
has the saved run's config on every key that changes the model, the data or what is logged. ``config.json`` is
written (atomically) only once the run is accepted and its checkpoint restored.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

from ntkcv._lock import FileLock, LockedError
from ntkcv.config import ConfigError, RunConfig, flatten, to_dict

#: Config keys a resumed run may change: how long it trains (``train.steps`` only upwards) and how it runs, not what.
RESUMABLE_KEYS = ("train.steps", "monitor.asynchronous", "monitor.blas_threads", "monitor.implementation",
                  "output.dir", "output.checkpoint_every", "output.progress", "output.compilation_cache")
#: What a run writes into its directory; any of them means the directory holds a run.
RUN_FILES = ("config.json", "ntkcv.h5", "tensorboard", "checkpoints")


def claim_run_dir(run_dir: pathlib.Path, config: RunConfig, *, resume: bool) -> FileLock:
    """Take ``run_dir``'s lock and admit the run; returns the held lock (release it when the run ends). Nothing in
    ``run_dir`` is changed when the run is refused.

    Raises:
      ValueError: ``run_dir`` cannot be created.
      LockedError: another live process runs in ``run_dir`` (an ``OSError``).
      FileExistsError: ``run_dir`` holds a run and ``resume`` is false.
      ConfigError: ``resume`` with a config that differs from the saved one on a key not in
        :data:`RESUMABLE_KEYS`, or with fewer ``train.steps``.
    """
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(run_dir / "ntkcv.lock", purpose="ntkcv train" + (" --resume" if resume else ""))
        lock.acquire()
    except LockedError as error:
        raise LockedError(f"output.dir {run_dir} is in use by another run ({error.holder}): wait for it to finish, "
                          "or choose another output.dir", error.holder) from None
    except OSError as error:
        raise ValueError(f"output.dir {str(run_dir)!r} is not a writable directory: {error}") from error
    try:
        holds_run = any((run_dir / name).exists() for name in RUN_FILES)
        if holds_run and not resume:
            raise FileExistsError(f"{run_dir} already holds a run: pass --resume to continue it (from its latest "
                                  "checkpoint, or from its start if it has none), or choose another output.dir")
        saved = run_dir / "config.json"
        if resume and saved.is_file():
            _check_resumable(json.loads(saved.read_text()), to_dict(config), run_dir)
    except BaseException:
        lock.release()
        raise
    return lock


def _check_resumable(saved: dict[str, Any], requested: dict[str, Any], run_dir: pathlib.Path) -> None:
    saved, requested = flatten(saved), flatten(json.loads(json.dumps(requested)))  # tuples as JSON lists
    changed = [f"{key} was {saved[key]!r}, now {requested[key]!r}" for key in requested
               if key in saved and key not in RESUMABLE_KEYS and saved[key] != requested[key]]
    if requested["train.steps"] < saved.get("train.steps", 0):
        changed.append(f"train.steps was {saved['train.steps']}, now {requested['train.steps']} (it may only grow)")
    if changed:
        raise ConfigError(f"--resume: the run in {run_dir} was made with another config: {'; '.join(changed)}. "
                          f"Only {', '.join(RESUMABLE_KEYS)} may change on resume")


def write_config(run_dir: pathlib.Path, config: RunConfig) -> None:
    """Write ``run_dir/config.json`` so that readers see the old or the new content, never a part."""
    path = run_dir / "config.json"
    partial = path.with_name(f".{path.name}.partial")
    with open(partial, "w") as file:
        file.write(json.dumps(to_dict(config), indent=2))
        file.flush()
        os.fsync(file.fileno())
    os.replace(partial, path)
