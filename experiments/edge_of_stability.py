"""Study 5: the edge of stability of full-batch gradient descent (Cohen et al. 2021, arXiv 2103.00065).

Prediction, stated before the runs (:mod:`ntkcv.studies.edge_of_stability`): for each step size η whose 2/η lies
above the initial sharpness, the Gauss–Newton sharpness rises (progressive sharpening) and, once it has reached
2/η, hovers there: the median of λ/(2/η) over the rest of the run lies in [0.9, 1.1].

Full mode: ``configs/experiments/edge_of_stability.yaml`` (a tanh MLP 64×64, MSE, 200 digits, full batch,
η ∈ {0.05, 0.055, 0.06} × 3 seeds, 3000 steps, the sharpness every 20: 9 runs). The findings give, per η, the
initial sharpness, peak/initial, the step at which 2/η is reached and the ratio after it, with bootstrap 95%
intervals over seeds, and ``figures/edge_of_stability.png`` the sharpness and loss curves.

``--quick`` (``QUICK``): η = 0.06 (2/η = 33.3, just above the initial 31), one seed, 800 steps: 1 run.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from experiments import _common

QUICK = {"grid.optimizer.learning_rate": [0.06], "grid.train.seed": [0], "base.train.steps": 800,
         "base.train.eval_every": 800, "base.output.checkpoint_every": 800}


def main(argv: Sequence[str] | None = None) -> int:
    return _common.main(argv, "edge_of_stability", __doc__, QUICK)


if __name__ == "__main__":
    sys.exit(main())
