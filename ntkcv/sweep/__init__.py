"""Sweeps: a grid of training runs, run resumably in parallel (locally or on Ray), summarised in one table.

``ntkcv sweep CONFIG`` expands a :class:`SweepConfig` (a base run config and a grid of dotted overrides)
into :class:`SweepRun` s, trains each in ``<sweep folder>/runs/<run_id>`` and writes ``results.csv``: per
run its config, the key points of each collective variable's trajectory and the final training metrics.
"""

from ntkcv.sweep._runner import run_sweep
from ntkcv.sweep._spec import SweepConfig, SweepRun, expand, load_sweep
from ntkcv.sweep._table import read_table, summarise_run

__all__ = ["SweepConfig", "SweepRun", "expand", "load_sweep", "read_table", "run_sweep", "summarise_run"]
