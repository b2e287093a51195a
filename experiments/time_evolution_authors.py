"""Study 1 on the authors' protocol: the NTK entropy over training as Tovey et al. (2024, arXiv 2410.07451) ran it.

Full mode: ``configs/experiments/time_evolution_authors.yaml`` (48 runs: the networks of the paper's figures, ReLU
and tanh, the NTK of the logits and of the softmax outputs, 1000 training digits, Adam 1e-3, batch 128, 500 epochs,
the NTK on every training point at dense early and log-spaced steps, 3 seeds). The same analysis as
``experiments/time_evolution.py`` (:mod:`ntkcv.studies.time_evolution`): ΔS and the regime per cell, and the
transient, S_min − S_0 and S_end − S_min with intervals and the step of the minimum, the trajectories on a
logarithmic step axis.

Prediction (the paper's): the entropy falls, at least transiently, in the small and shallow networks (width 12 at
depth 3, depth 2 at width 100) and rises in the wide and deep ones (width 1000, depth 10).

``--quick`` (``QUICK``): width 12 vs 100×2, ReLU, softmax outputs, 200 training points, 60 steps with the NTK at 15
log-spaced steps, 2 seeds: 4 runs.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from experiments import _common

QUICK = {"grid.model.widths": [[12, 12, 12], [100, 100]], "grid.model.activation": ["relu"],
         "grid.monitor.outputs": ["softmax"], "grid.train.seed": [0, 1], "base.data.train_size": 200,
         "base.train.steps": 60, "base.train.batch_size": 64, "base.train.eval_every": 60,
         "base.monitor.every_steps": 60, "base.monitor.log_spaced": 15, "base.data.probe_size": 64,
         "base.output.checkpoint_every": 60}


def main(argv: Sequence[str] | None = None) -> int:
    return _common.main(argv, "time_evolution_authors", __doc__, QUICK)


if __name__ == "__main__":
    sys.exit(main())
