"""Study 3: training sets selected by random network distillation (RND) against random ones of equal size.

Full mode: ``configs/experiments/rnd_selection.yaml``. For each seed and size the script selects, from that
seed's full training split, an RND set (:func:`ntkcv.selection.rnd_select`) and a uniformly random set
(:func:`ntkcv.selection.random_select`), each keyed by the seed, records them in ``selections.json`` and
trains on each (``data.indices``) with that seed's initialisation: 3 sizes × 16 seeds × 2 = 96 runs, about
7 min on two CPU cores (of which the RND selections take about 2). The findings give the paired differences
RND − random of the initial entropy and trace and of the final test accuracy per size with bootstrap 95%
intervals (:mod:`ntkcv.studies.rnd_selection`).

``--quick`` (``QUICK``): n = 30, three seeds, 100 steps: 6 runs.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

import jax

from experiments import _common
from ntkcv.config import ConfigError
from ntkcv.data import load_dataset
from ntkcv.selection import random_select, rnd_select
from ntkcv.studies.rnd_selection import write_selections
from ntkcv.sweep import SweepConfig, expand

QUICK = {
    "grid.data.train_size": [30],
    "grid.train.seed": [0, 1, 2],
    **_common.QUICK_TRAINING,
}
GRID = ("data.train_size", "train.seed")


def select(sweep: SweepConfig) -> list[dict[str, Any]]:
    """The RND and the random set of every (``data.train_size``, ``train.seed``) grid point of ``sweep``:
    dicts with ``method``, ``seed``, ``size`` and ``indices`` (rows of that seed's full training split)."""
    if set(sweep.grid) != set(GRID) or sweep.runs:
        raise ConfigError(f"the rnd_selection sweep's grid must have exactly the keys {', '.join(GRID)} and no runs; "
                          f"got grid keys {', '.join(sweep.grid) or 'none'} and {len(sweep.runs)} runs")
    configs = {(run.config.train.seed, run.config.data.train_size): run.config for run in expand(sweep)}
    selections = []
    for seed in dict.fromkeys(seed for seed, _ in configs):
        sizes = [size for s, size in configs if s == seed]
        data_config = configs[seed, sizes[0]].data
        x = load_dataset(data_config.name, path=data_config.path, seed=seed).x_train  # the full training split
        rnd_key, random_key = jax.random.split(jax.random.key(seed))
        for size in sizes:
            selections += [
                {"method": "rnd", "seed": seed, "size": size, "indices": rnd_select(x, size, key=rnd_key).tolist()},
                {"method": "random", "seed": seed, "size": size,
                 "indices": random_select(len(x), size, key=random_key).tolist()},
            ]
    return selections


def selection_sweep(sweep: SweepConfig, selections: list[dict[str, Any]]) -> SweepConfig:
    """``sweep`` with its grid replaced by one run per selection (``train.seed`` and ``data.indices``)."""
    runs = tuple({"train.seed": s["seed"], "data.indices": s["indices"]} for s in selections)
    return dataclasses.replace(sweep, grid={}, runs=runs)


def main(argv: Sequence[str] | None = None) -> int:
    args = _common.parse(argv, "rnd_selection", __doc__)
    sweep = _common.load("rnd_selection", args, QUICK)
    selections = select(sweep)
    write_selections(args.dir, selections)
    _common.run_and_report(selection_sweep(sweep, selections), args.dir, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
