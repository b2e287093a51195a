"""Study 3 on the authors' protocol: RND-selected vs random training sets as the ZnRND draft of 2022 ran them.

Full mode: ``configs/experiments/rnd_selection_authors.yaml``. Per seed the script draws a pool of 500 images of that
seed's training split (:func:`ntkcv.selection.random_select`); RND (:func:`ntkcv.selection.rnd_select` with
:data:`RND_NETWORKS`: target and predictor ReLU MLPs (128, 128) → 256, a random first pick, then the greedy argmax of
the squared difference, the predictor retrained after each pick with at least 100 full-batch Adam steps (10⁻²) and on
until its loss per output is below 10⁻³, at most 1000) orders 90 of them, and a uniformly random order of 90 is drawn
from the same pool. The training sets are the prefixes of 10, 30, 50, 70 and 90 (greedy selection is nested, so a
prefix is the set RND picks for that size, as the draft, which ran each size afresh, picked it). Per set the script
records in ``selections.json`` the effective entropy of the RND target network's cosine-normalised NTK on it
(:func:`target_entropy`) and its class balance, then trains the draft's CNN (Conv 32, Conv 64, Dense 256, Dense 10,
ReLU; Adam 10⁻², batch 10, cross-entropy) on it for 50 epochs, with the test accuracy after every epoch and the
classifier's NTK on the set at the first and the last step: 5 sizes × 20 seeds × 2 = 200 runs, about 20 min on two
CPU cores shared with other jobs (per seed: its selections 18 s, its 10 runs 45 s with two workers; a resumed sweep
recomputes the selections, identically, then skips the finished runs). The findings
(:mod:`ntkcv.studies.rnd_selection_authors`) set the means ± SE beside the draft's numbers and give the paired
differences RND − random with bootstrap 95% intervals.

Prediction (the draft's; mean ± SE over 3 seeds, 28×28 MNIST): the target's effective entropy is larger on RND sets at
every size, by less as n grows (0.628 ± 0.006 vs 0.561 ± 0.014 at n = 10, 0.508 ± 0.010 vs 0.489 ± 0.010 at 30,
0.430 ± 0.004 vs 0.419 ± 0.002 at 90); the best test accuracy is higher on RND sets at small n (0.45 vs 0.34 at 10,
0.617 vs 0.399 at 30) but not at large n (0.555 vs 0.781 at 70, 0.809 vs 0.827 at 90). Mismatches that move the
absolute numbers: 8×8 digits instead of MNIST (a pool from 1437 training images, all 360 test images against 500),
MLP instead of CNN RND networks (the convolutions make the greedy loop about 30 times slower on a CPU), full-batch
instead of batch-1 predictor training, twenty seeds instead of three.

``--quick`` (``QUICK``, :data:`QUICK_PROTOCOL`): n = 10 and 20, two seeds, a pool of 100, at least 20 predictor steps
per pick (at most 200), 5 epochs: 8 runs.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

import ntkcv
from experiments import _common
from ntkcv.config import ConfigError
from ntkcv.data import load_dataset
from ntkcv.selection import random_select, rnd_networks, rnd_select
from ntkcv.studies.rnd_selection import write_selections
from ntkcv.studies.rnd_selection_authors import class_balance
from ntkcv.sweep import SweepConfig, expand
from ntkcv.zoo import MLP

QUICK = {"grid.data.train_size": [10, 20], "grid.train.seed": [0, 1]}
GRID = ("data.train_size", "train.seed")
RND_NETWORKS = {"architecture": MLP((128, 128), 256, "relu")}
"""The RND target and predictor: one architecture, as in the draft (whose CNNs end in 256 outputs)."""
UNTIL_LOSS = 1e-3
"""The predictor's loss per output on the selected set that ends its training after a pick (the draft's)."""


@dataclasses.dataclass(frozen=True)
class Protocol:
    """The pool size, the classifier's epochs and the predictor's Adam steps per pick (at least, at most)."""

    pool: int = 500
    epochs: int = 50
    predictor_steps: int = 100
    predictor_max_steps: int = 1000


QUICK_PROTOCOL = Protocol(pool=100, epochs=5, predictor_steps=20, predictor_max_steps=200)


def target_entropy(kernel_fn: Callable[..., jax.Array], params: Any, x: np.ndarray) -> float:
    """S/ln n of the cosine-normalised NTK ``kernel_fn(params, x)`` (:func:`ntkcv.cv.cosine_kernel`)."""
    return float(ntkcv.cv.effective_entropy(ntkcv.cv.cosine_kernel(kernel_fn(params, x))))


def select(sweep: SweepConfig, protocol: Protocol = Protocol()) -> list[dict[str, Any]]:
    """The RND and the random set of every (``data.train_size``, ``train.seed``) grid point of ``sweep``: dicts with
    ``method``, ``seed``, ``size``, ``indices`` (rows of that seed's full training split), ``target_entropy``,
    ``classes`` and ``class_entropy`` (:func:`~ntkcv.studies.rnd_selection_authors.class_balance`), and for RND sets
    ``rounds_at_cap`` (the picks after which the predictor stopped at ``predictor_max_steps`` above the threshold)."""
    if set(sweep.grid) != set(GRID) or sweep.runs:
        raise ConfigError(f"the rnd_selection_authors sweep's grid must have exactly the keys {', '.join(GRID)} and no "
                          f"runs; got grid keys {', '.join(sweep.grid) or 'none'} and {len(sweep.runs)} runs")
    configs = {(run.config.train.seed, run.config.data.train_size): run.config for run in expand(sweep)}
    architecture = RND_NETWORKS["architecture"]  # every seed's target: its parameters from rnd_networks
    kernel_fn = ntkcv.ntk_fn(lambda params, x: architecture.apply({"params": params}, x))
    selections = []
    for seed in dict.fromkeys(seed for seed, _ in configs):
        sizes = sorted(size for s, size in configs if s == seed)
        data_config = configs[seed, sizes[0]].data
        data = load_dataset(data_config.name, path=data_config.path, seed=seed)  # the full training split
        pool_key, rnd_key, random_key = jax.random.split(jax.random.key(seed), 3)
        pool = random_select(len(data.x_train), protocol.pool, key=pool_key)
        rnd_order, training = rnd_select(
            data.x_train, sizes[-1], key=rnd_key, candidates=pool, steps=protocol.predictor_steps,
            max_steps=protocol.predictor_max_steps, learning_rate=1e-2, until_loss=UNTIL_LOSS, random_start=True,
            with_training=True, **RND_NETWORKS)
        orders = {"rnd": rnd_order, "random": random_select(len(data.x_train), sizes[-1], key=random_key,
                                                            candidates=pool)}
        target = rnd_networks(data.x_train, key=rnd_key, **RND_NETWORKS).target
        for size in sizes:
            for method, order in orders.items():
                rows = order[:size]
                record = {"method": method, "seed": seed, "size": size, "indices": rows.tolist(),
                          "target_entropy": target_entropy(kernel_fn, target.params, data.x_train[rows]),
                          **class_balance(data.y_train[rows], data.num_classes)}
                if method == "rnd":
                    record["rounds_at_cap"] = int(np.sum(training.loss[:size] > UNTIL_LOSS))
                selections.append(record)
    return selections


def selection_sweep(sweep: SweepConfig, selections: list[dict[str, Any]], epochs: int) -> SweepConfig:
    """``sweep`` with its grid replaced by one run per selection: ``train.seed``, ``data.indices``, and ``epochs``
    epochs (``train.steps``) with the test accuracy after each (``train.eval_every``: the batches per epoch)."""
    batch_size = expand(sweep)[0].config.train.batch_size

    def batches(size: int) -> int:
        return 1 if batch_size == "full" else max(size // batch_size, 1)

    runs = tuple({"train.seed": s["seed"], "data.indices": s["indices"], "train.steps": epochs * batches(s["size"]),
                  "train.eval_every": batches(s["size"])} for s in selections)
    return dataclasses.replace(sweep, grid={}, runs=runs)


def main(argv: Sequence[str] | None = None) -> int:
    args = _common.parse(argv, "rnd_selection_authors", __doc__)
    sweep = _common.load("rnd_selection_authors", args, QUICK)
    protocol = QUICK_PROTOCOL if args.quick else Protocol()
    selections = select(sweep, protocol)
    write_selections(args.dir, selections)
    _common.run_and_report(selection_sweep(sweep, selections, protocol.epochs), args.dir, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
