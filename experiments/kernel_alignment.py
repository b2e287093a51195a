"""Study 6: the NTK's alignment with the labels over training (Baratin et al. 2021, arXiv 2008.00938).

Prediction, stated before the runs (:mod:`ntkcv.studies.kernel_alignment`): the centred kernel–target alignment
A_c = ⟨HΘH, HYYᵀH⟩_F / (‖HΘH‖_F ‖HYYᵀH‖_F) of the NTK on held-out (test) points rises during training, and it
rises more where features are learnt (the larger step, the narrower network, in the standard parameterisation)
than near the lazy limit (the smaller step, the wider network), where the kernel barely moves.

Full mode: ``configs/experiments/kernel_alignment.yaml`` (tanh MLPs 64×64, 256×256 and 1024×1024 on 500 digits,
the MSE loss, SGD with batches of 64, each at a larger and a 10 times smaller step, the learning rates scaled as
1/width; 3 seeds; the alignment on 256 training and 256 test probes at step 0, on log-spaced steps and every 250
steps: 18 runs). The MSE loss because the lazy limit is exact for it (the network follows kernel regression
with its initial kernel, Lee et al. 2019), so the near-lazy cells have a clean reference, ΔA_c → 0; under the
cross-entropy the logits keep growing and no kernel solution marks the limit. The findings give, per cell, A_c at
the start and the end, ΔA_c with its bootstrap 95% interval over seeds, the kernel's drift, and the paired
differences between neighbouring cells; ``figures/kernel_alignment.png`` the alignment curves and
``figures/kernel_alignment_drift.png`` ΔA_c against the drift. The 256×256 network and the comparison at equal
gradient-flow time η·t were added after a pilot with one seed of the other four cells; the prediction is as it
was.

``--quick`` (``QUICK``): the 64×64 network alone at both steps, two seeds, 300 steps: 4 runs.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from experiments import _common

QUICK = {"runs": [{"model.widths": [64, 64], "optimizer.learning_rate": 0.05},
                  {"model.widths": [64, 64], "optimizer.learning_rate": 0.005}],
         "grid.train.seed": [0, 1], "base.train.steps": 300, "base.train.eval_every": 300,
         "base.monitor.every_steps": 100, "base.monitor.log_spaced": 8, "base.output.checkpoint_every": 300}


def main(argv: Sequence[str] | None = None) -> int:
    return _common.main(argv, "kernel_alignment", __doc__, QUICK)


if __name__ == "__main__":
    sys.exit(main())
