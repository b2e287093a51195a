"""Study 2: the NTK's entropy and trace at initialisation, on the training set, against the test accuracy.

Full mode: ``configs/experiments/data_quality.yaml`` (40 random subsets of each of n = 30, 100, 300 with one
fixed initialisation: 120 runs, about 6 min on two CPU cores). The findings give Spearman's ρ of the initial
entropy and of the initial trace with the final test accuracy per n, with paired bootstrap 95% intervals
(:mod:`ntkcv.studies.data_quality`); ``figures/data_quality_scatter.png`` shows the points.

``--quick`` (``QUICK``): n = 30, 10 subsets, 100 steps: 10 runs.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from experiments import _common

QUICK = {
    "grid.data.train_size": [30],
    "grid.data.subset_seed": list(range(10)),
    **_common.QUICK_TRAINING,
}


def main(argv: Sequence[str] | None = None) -> int:
    return _common.main(argv, "data_quality", __doc__, QUICK)


if __name__ == "__main__":
    sys.exit(main())
