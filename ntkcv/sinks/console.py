"""Console sink: a rich progress bar with the latest scalars (rich imported only here)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ntkcv.sinks.base import Sink, check_step


class ConsoleSink(Sink):
    """Shows training progress and the latest values of chosen scalars.

    On a terminal: a live rich progress bar (step of ``total``, elapsed and remaining time) followed by
    ``name=value`` for each name in ``show``. Elsewhere (CI logs, a file): one plain line
    ``step 120/1000  train/loss=0.31  cv/entropy=2.07`` at most every ``every_secs`` seconds, and the
    last one on ``close``. Steps count from 0, so after step ``s`` the bar shows ``s + 1`` done.
    ``write_hparams`` prints the hyper-parameters once; arrays are dropped.

    Args:
      total: the number of training steps, if known.
      show: the scalar names to display, in order; names never written are left out.
      console: where to print (default: a ``rich.console.Console`` on stdout).
      every_secs: the least time between two plain lines when not on a terminal.
      clock: returns the time in seconds (injectable for tests).
      description: the text before the bar.
    """

    def __init__(
        self,
        total: int | None = None,
        *,
        show: Sequence[str] = ("train/loss", "cv/entropy"),
        console: Console | None = None,
        every_secs: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        description: str = "training",
    ):
        if total is not None and (isinstance(total, bool) or not isinstance(total, int) or total < 1):
            raise ValueError(f"total must be a positive integer or None, got {total!r}")
        if every_secs < 0:
            raise ValueError(f"every_secs must be non-negative, got {every_secs!r}")
        self.total, self.show, self.every_secs, self.clock = total, tuple(show), every_secs, clock
        self.console = console if console is not None else Console()
        self.latest: dict[str, float] = {}
        self._step: int | None = None
        self._printed_step: int | None = None
        self._last_print = -np.inf
        self._closed = False
        self._progress: Progress | None = None
        if self.console.is_terminal:
            self._progress = Progress(
                TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[scalars]}"),
                console=self.console)
            self._task = self._progress.add_task(description, total=total, scalars="")
            self._progress.start()

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        self._check_open()
        self._step = check_step(step)
        self.latest.update({name: float(value) for name, value in scalars.items() if name in self.show})
        if self._progress is not None:
            done = self._step + 1 if self.total is None else min(self._step + 1, self.total)
            self._progress.update(self._task, completed=done, scalars=self._scalars_text())
        elif self.clock() - self._last_print >= self.every_secs:
            self._print_line()

    def write_arrays(self, step: int, arrays: Mapping[str, np.ndarray]) -> None:
        self._check_open()  # arrays are dropped

    def write_hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float] | None = None) -> None:
        self._check_open()
        items = [*hparams.items(), *(metrics or {}).items()]
        self.console.print("hparams: " + ", ".join(f"{k}={v}" for k, v in items), markup=False, highlight=False,
                           soft_wrap=True)

    def flush(self) -> None:
        if self._progress is not None and not self._closed:
            self._progress.refresh()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._progress is not None:
            self._progress.stop()
        elif self._step is not None and self._printed_step != self._step:
            self._print_line()

    def _scalars_text(self) -> str:
        return "  ".join(f"{name}={self.latest[name]:.4g}" for name in self.show if name in self.latest)

    def _print_line(self) -> None:
        of_total = "" if self.total is None else f"/{self.total}"
        line = f"step {self._step}{of_total}  {self._scalars_text()}".rstrip()
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)
        self._last_print, self._printed_step = self.clock(), self._step

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("ConsoleSink is closed")
