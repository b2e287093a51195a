"""Study 6: the lazy regime, the NTK's change during training against width (issue 18, item 2a).

Prediction, stated before the runs (:mod:`ntkcv.studies.lazy_regime`): in the NTK parameterisation, trained by
full-batch gradient descent on the MSE loss for a fixed training time (t = η·steps) at η = 0.5·2/λ∞, the relative
kernel change ‖Θ_T − Θ₀‖_F / ‖Θ₀‖_F falls with the width w as w^b with b's bootstrap interval (over seeds) below
0, below −1/2 (Lee et al. 2019, arXiv 1902.06720, bound it by O(w^(−1/2))) and containing −1 (Dyer & Gur-Ari 2019,
arXiv 1909.11304, predict w^(−1) for the change during training). At η = 1.5·2/λ∞, above the stability threshold
2/λ₀ (the catapult phase, Lewkowycz et al. 2020, arXiv 2003.02218), the change does not shrink: b's interval
contains 0 or lies above. In the standard parameterisation with Adam (1e-3) b's interval lies above the lazy one.

λ∞ is the top eigenvalue of the Gauss–Newton matrix at initialisation in the infinite-width limit, Θ∞/n with Θ∞
= ``ntkcv.infinite_width_ntk(depth, activation, parameterization="ntk", weight_std=NTK_WEIGHT_STD,
bias_std=NTK_BIAS_STD)`` on the n training points (the NTK-parameterised MLP's kernel per output tends to it).
This script computes it on every seed's training set (:func:`infinite_width_sharpness`), and adds one arm
``{optimizer.learning_rate: c·2/λ∞}`` per factor c of :data:`STEP_FACTORS` to the sweep's ``runs`` (the YAML's
base is the NTK-parameterised MLP with gradient descent; its own ``runs`` entry is the Adam arm). Each run's own
λ₀ (``curvature/ggn_max`` at step 0) then says which regime it was in.

Full mode: ``configs/experiments/lazy_regime.yaml`` (a tanh MLP w×w on 200 digits, MSE, full batch, 300 steps,
widths 64 … 2048, three seeds, three arms: 54 runs). The findings give, per arm and width, the kernel change with
its interval, ηλ₀ and the regimes, and per arm the fitted exponent; ``figures/lazy_regime.png`` the kernel change
against width.

``--quick`` (``QUICK``): widths 64 and 512, one seed, 100 steps, the three arms: 6 runs.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from experiments import _common
from ntkcv.config import ConfigError
from ntkcv.data import load_dataset
from ntkcv.infinite import infinite_width_ntk
from ntkcv.sweep import SweepConfig, expand
from ntkcv.zoo import NTK_BIAS_STD, NTK_WEIGHT_STD

STEP_FACTORS = (0.5, 1.5)
"""η = c · 2/λ∞ for each factor c: below the stability threshold (lazy) and above it (catapult)."""
QUICK = {"grid.model.widths": [[64, 64], [512, 512]], "grid.train.seed": [0], "base.train.steps": 100,
         "base.train.eval_every": 100, "base.monitor.every_steps": 100, "base.output.checkpoint_every": 100}


def infinite_width_sharpness(sweep: SweepConfig) -> float:
    """λ∞: the top eigenvalue of Θ∞/n on the training set, the mean over the distinct training sets (seeds) of the
    sweep's grid points without its ``runs`` (the base: NTK parameterisation, gradient descent).

    Raises:
      ConfigError: the base is not an NTK-parameterised network trained by gradient descent.
    """
    configs = [run.config for run in expand(dataclasses.replace(sweep, runs=()))]
    if any(c.model.parameterization != "ntk" or c.optimizer.name != "sgd" for c in configs):
        raise ConfigError("the lazy_regime sweep's base (and grid) must have model.parameterization 'ntk' and "
                          "optimizer.name 'sgd': the step sizes of its gradient-descent arms come from the "
                          "infinite-width kernel")
    settings = {(c.data, c.train.seed, len(c.model.widths), c.model.activation): c for c in configs}
    values = []
    for data, seed, depth, activation in settings:
        x = load_dataset(data.name, path=data.path, train_size=data.train_size, test_size=data.test_size,
                         seed=seed, subset_seed=data.subset_seed, indices=data.indices).x_train
        kernel = infinite_width_ntk(depth, activation, parameterization="ntk", weight_std=NTK_WEIGHT_STD,
                                    bias_std=NTK_BIAS_STD)(x)
        values.append(float(np.linalg.eigvalsh(np.asarray(kernel, np.float64))[-1]) / len(x))
    return float(np.mean(values))


def arms(sharpness: float) -> tuple[dict[str, Any], ...]:
    """One ``runs`` entry per factor of :data:`STEP_FACTORS`: ``optimizer.learning_rate`` = c · 2/λ∞ (4 digits)."""
    return tuple({"optimizer.learning_rate": float(f"{factor * 2 / sharpness:.4g}")} for factor in STEP_FACTORS)


def main(argv: Sequence[str] | None = None) -> int:
    args = _common.parse(argv, "lazy_regime", __doc__)
    sweep = _common.load("lazy_regime", args, QUICK)
    sharpness = infinite_width_sharpness(sweep)
    added = arms(sharpness)
    print(f"λ∞ = {sharpness:.4f} (2/λ∞ = {2 / sharpness:.4f}); step sizes " + ", ".join(
        f"c = {factor:g}: η = {arm['optimizer.learning_rate']:g}" for factor, arm in zip(STEP_FACTORS, added,
                                                                                      strict=True)), flush=True)
    _common.run_and_report(dataclasses.replace(sweep, runs=(*sweep.runs, *added)), args.dir, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
