"""The phase diagram: the NTK entropy and trace at initialisation and after training over width × depth (ReLU).

Tovey et al. (2024, arXiv 2410.07451) draw it from dense ReLU networks trained on 1000 MNIST images (their
``scale-diagram.ipynb``: the entropy, the trace and the training loss at epoch 0 and epoch 99, softmax outputs, one
seed per network); this sweep reruns it on the embedded digits and :mod:`ntkcv.studies.phase_diagram` adds
intervals over seeds, scaling fits and verdicts.

Prediction, stated before the runs. The paper's abstract: the entropy falls during training (information
compression) predominantly in small networks and rises (structure formation) in deep ones, the onset of a
deep-learning regime; so ΔS = S_T − S₀ is negative in the narrowest, shallowest network, positive in the widest,
deepest, and grows with width and depth. Over the diagram (its figure was not at hand here, only the notebook that
draws it), the entropy at initialisation S₀ and after training S_T rise with width and with depth: a power law
S ∝ x^b with b > 0 along each axis. Since S ≤ ln N (N = 1000 points: 6.91), growth must saturate, so a logarithm
S = a + b ln x fits at least as well as the power law. Against the depth trend stands infinite-width theory: the
normalised NTK of a deep ReLU network tends to the all-ones matrix as the depth grows (St-Arnaud et al. 2025, arXiv
2511.07272), a rank-one kernel of entropy 0, so at large width S₀ may instead fall with depth.

Full mode: ``configs/experiments/phase_diagram.yaml`` (90 runs: widths 4, 12, 50, 100, 500, 1000 × depths 1, 2, 3,
5, 10, 3 seeds; 1000 training digits, Adam 1e-3, batch 128, 100 epochs = 700 steps, the NTK of the softmax outputs
on all training points at step 0 and at the last step). About 10–15 minutes on two idle CPU cores with two workers
(twice that or more while other jobs share the cores), most of it in the widest and deepest networks. The findings
give per cell S₀, S_T, ΔS, tr₀/N, tr_T/N with intervals and the fits; ``figures/phase_diagram.png`` the heat maps,
``figures/phase_diagram_fits.png`` the fits.

``--quick`` (``QUICK``): widths 4 and 50 × depths 1 and 2, one seed, 200 training digits, 30 steps: 4 runs.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from experiments import _common

QUICK = {"grid.model.widths": [[4], [4, 4], [50], [50, 50]], "grid.train.seed": [0], "base.data.train_size": 200,
         "base.train.steps": 30, "base.train.batch_size": 64, "base.train.eval_every": 30,
         "base.monitor.every_steps": 30, "base.output.checkpoint_every": 30}


def main(argv: Sequence[str] | None = None) -> int:
    return _common.main(argv, "phase_diagram", __doc__, QUICK)


if __name__ == "__main__":
    sys.exit(main())
