"""The collective-variable studies: analyses of a sweep's results table that check a paper's claims.

One module per study, each with ``analyse(rows) -> Findings`` (numbers with bootstrap confidence intervals
and a verdict per claim) and ``figures(rows, out_dir, *, sweep_dir=None) -> list[Path]``:

=========================  =========================================================================================
``time_evolution``         does the NTK entropy fall, stay or rise over training, and dip on the way (Tovey et al.
                           2024)?
``data_quality``           do the initial NTK's entropy and trace predict the test accuracy (Tovey et al. 2023)?
``data_quality_authors``   the same on the authors' protocol: a CNN, several trainings per subset, sizes pooled with
                           a partial correlation controlling for the size?
``rnd_selection``          do RND-selected training sets beat random ones (Tovey et al. 2023)?
``rnd_selection_authors``  the same on the authors' protocol: the RND target network's cosine-NTK entropy, best and
                           final accuracy, class balance?
``weight_spectra``         do weight-spectrum exponents track the test accuracy (Martin & Mahoney 2019)?
``edge_of_stability``      does the sharpness rise to 2/η and hover there under full-batch GD (Cohen et al. 2021)?
``lazy_regime``            does the kernel change shrink with width, and at what rate (Lee et al. 2019)?
``kernel_alignment``       does the test kernel–target alignment rise, more where features are learnt (Baratin et
                           al. 2021)?
``phase_diagram``          how do the NTK entropy and trace at initialisation and after training vary over width ×
                           depth (Tovey et al. 2024)?
=========================  =========================================================================================

:func:`make_sweep_report` runs the studies a sweep was made for; ``experiments/`` holds the sweeps;
:mod:`ntkcv.studies.fit` fits power laws and logarithms with bootstrap intervals.
"""

from ntkcv.studies._findings import Claim, Findings, Table
from ntkcv.studies._stats import Estimate, mean_ci, spearman_ci
from ntkcv.studies.report import STUDIES, make_sweep_report, study

__all__ = ["STUDIES", "Claim", "Estimate", "Findings", "Table", "make_sweep_report", "mean_ci", "spearman_ci",
           "study"]
