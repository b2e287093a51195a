"""When the monitor fires: every n steps, on listed steps, on log-spaced steps, or every t seconds."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable


class Schedule:
    """A trigger over training steps; triggers combine with *or*.

    Args:
      every_steps: fire when ``step % every_steps == 0``.
      on_steps: fire on exactly these steps.
      log_spaced: ``(first, last, count)``: ``count`` steps log-uniform in ``[first, last]`` (rounded,
        duplicates dropped), dense early in training where the NTK moves fastest.
      every_secs: fire when at least this many seconds passed since the last firing (the first call
        fires).
      clock: seconds as a float; injectable so tests need not sleep.
    """

    def __init__(
        self,
        *,
        every_steps: int | None = None,
        on_steps: Iterable[int] = (),
        log_spaced: tuple[int, int, int] | None = None,
        every_secs: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        if every_steps is not None and (not isinstance(every_steps, int) or every_steps < 1):
            raise ValueError(f"every_steps must be a positive integer, got {every_steps!r}")
        if every_secs is not None and every_secs <= 0:
            raise ValueError(f"every_secs must be positive, got {every_secs!r}")
        steps = {int(s) for s in on_steps}
        if log_spaced is not None:
            first, last, count = log_spaced
            if not 1 <= first <= last or count < 1:
                raise ValueError(f"log_spaced must be (first, last, count) with 1 <= first <= last, count >= 1, "
                                 f"got {log_spaced!r}")
            ratio = (last / first) ** (1 / max(count - 1, 1))
            steps |= {round(first * ratio**i) for i in range(count)}
        if every_steps is None and not steps and every_secs is None:
            raise ValueError("the schedule never fires: give every_steps, on_steps, log_spaced or every_secs")
        self.every_steps, self.steps, self.every_secs, self.clock = every_steps, frozenset(steps), every_secs, clock
        self._last_fired = -math.inf

    def __call__(self, step: int) -> bool:
        """Whether the monitor fires at ``step`` (marks the time when it does)."""
        fire = (self.every_steps is not None and step % self.every_steps == 0) or step in self.steps
        if self.every_secs is not None and self.clock() - self._last_fired >= self.every_secs:
            fire = True
        if fire:
            self._last_fired = self.clock()
        return fire
