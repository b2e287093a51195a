"""Study 2 on the authors' protocol: the initial NTK's entropy and trace against the mean test accuracy of five
trainings per random training subset, as Tovey et al. (2023, arXiv 2305.00995) ran it.

Full mode: ``configs/experiments/data_quality_authors.yaml`` (20 random subsets of each of n = 10, 30, 50, 70,
90 digits, the authors' small CNN, Adam 1e-3, batch 10, 500 epochs, 5 trainings per subset (``train.seed`` 0–4)
on the same images and test set (``data.seed`` 0), the CVs at initialisation of ``train.seed`` 0 on the subset's
own points: 500 runs, about 25 min on two CPU cores). It sits beside ``experiments/data_quality.py`` (an MLP, one
training per subset); :mod:`ntkcv.studies.data_quality_authors` reports Spearman's ρ of the initial effective
entropy and of the initial trace with the mean final test accuracy per n, the accuracy's spread over a subset's
trainings against its spread over subsets, and, pooled over the sizes, the partial ρ controlling for n (the raw
pooled ρ mixes in the size, which moves the CVs and the accuracy together), with bootstrap 95% intervals;
``figures/data_quality_authors_scatter.png`` shows the points.

Prediction (the paper's): ρ > 0 for the entropy and for the trace, within every size and pooled.

Known mismatches: 8×8 digits instead of 28×28 MNIST (so the CNN's convolutions pad ('SAME') where the authors'
did not, and its dense layer sees 2×2×64 features); the 360 test images of the digits split, so an accuracy moves
in steps of 1/360 ≈ 0.003 (the authors' 2022 notebook tested on the first 1000 MNIST test images and drew the
subsets from the first 1000 training images; here from the 1437 of the training split); the final accuracy, not a
summary over epochs; the trainings include the run whose initialisation gives the CVs (the authors' five were
fresh ones).

``--quick`` (``QUICK``): n = 10 and 30, 4 subsets, 2 trainings each, 20 epochs: 16 runs.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from experiments import _common


def training_runs(sizes: Sequence[int], *, trainings: int, epochs: int, batch_size: int = 10
                  ) -> list[dict[str, Any]]:
    """The sweep's ``runs``: per size ``n``, ``trainings`` runs (``train.seed`` 0, 1, …) of ``epochs`` epochs of
    ⌈n / batch_size⌉ steps; the monitor (the study's CVs at initialisation) on ``train.seed`` 0 alone."""
    return [{"data.train_size": n, "train.steps": epochs * -(-n // batch_size), "train.seed": seed,
             **({} if seed == 0 else {"monitor.enabled": False})} for n in sizes for seed in range(trainings)]


QUICK = {"grid.data.subset_seed": [0, 1, 2, 3], "runs": training_runs((10, 30), trainings=2, epochs=20)}


def main(argv: Sequence[str] | None = None) -> int:
    return _common.main(argv, "data_quality_authors", __doc__, QUICK)


if __name__ == "__main__":
    sys.exit(main())
