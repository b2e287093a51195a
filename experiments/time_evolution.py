"""Study 1: the NTK entropy over training, across widths, depths, training-set sizes, losses and optimisers.

Full mode: ``configs/experiments/time_evolution.yaml`` (288 runs, about 14 min on two CPU cores). For each
cell (loss + optimiser, n, network) the findings give ΔS = final − initial effective entropy with a bootstrap
95% interval over the seeds and the regime fell / stayed / rose / diverged (:mod:`ntkcv.studies.time_evolution`),
and ``figures/time_evolution_regimes.png`` maps the regimes.

``--quick`` (``QUICK``): networks 8 and 256×2, n = 30, three seeds, cross-entropy + Adam and MSE + SGD,
100 steps with the NTK every 10: 12 runs.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from experiments import _common

QUICK = {
    "grid.model.widths": [[8], [256, 256]],
    "grid.data.train_size": [30],
    "grid.train.seed": [0, 1, 2],
    "runs": [{"train.loss": "cross_entropy", "optimizer.name": "adam", "optimizer.learning_rate": 0.001},
             {"train.loss": "mse", "optimizer.name": "sgd", "optimizer.learning_rate": 0.1}],
    **_common.QUICK_TRAINING,
}


def main(argv: Sequence[str] | None = None) -> int:
    return _common.main(argv, "time_evolution", __doc__, QUICK)


if __name__ == "__main__":
    sys.exit(main())
