"""Batch experiments that rerun the collective-variable studies, one script per study.

- ``python -m experiments.time_evolution``: the NTK entropy over training across widths, depths, training-set
  sizes, losses and optimisers (fell / stayed / rose / diverged per cell);
- ``python -m experiments.data_quality``: the initial NTK's entropy and trace vs the final test accuracy over
  random training subsets;
- ``python -m experiments.data_quality_authors``: the same on Tovey et al.'s protocol (their small CNN, Adam 1e-3,
  batch 10, 500 epochs, the mean accuracy of 5 trainings per subset, sizes 10–90 pooled with a partial correlation);
- ``python -m experiments.rnd_selection``: RND-selected vs random training sets;
- ``python -m experiments.rnd_selection_authors``: the same on the authors' protocol (a pool of 500, the RND target
  network's cosine-normalised NTK entropy, the draft's CNN for 50 epochs, best and final accuracy, class balance);
- ``python -m experiments.weight_spectra``: weight-spectrum α and α̂ vs the test accuracy (reuses the
  time-evolution runs);
- ``python -m experiments.time_evolution_authors``: the time evolution on Tovey et al.'s protocol (their networks,
  ReLU and tanh, softmax outputs, 500 epochs, dense early snapshots);
- ``python -m experiments.edge_of_stability``: the sharpness under full-batch gradient descent (Cohen et al. 2021);
- ``python -m experiments.lazy_regime``: the kernel change against width (Lee et al. 2019; the catapult phase);
- ``python -m experiments.kernel_alignment``: the test kernel–target alignment over training (Baratin et al. 2021);
- ``python -m experiments.phase_diagram``: the NTK entropy and trace at initialisation and after training over a
  width × depth grid of ReLU networks (Tovey et al. 2024's phase diagram).

Each script loads its sweep from ``configs/experiments/<study>.yaml`` (the full mode, ≤ 60 min on two CPU
cores on the embedded digits), runs it (resumably: rerun the same command after a crash), writes
``figures/*.png`` and ``findings.md`` into the sweep's folder and prints the findings; ``ntkcv report
SWEEP_DIR`` rewrites them from the table. Options: ``--quick`` (the small version the tests run: a documented
set of overrides, ``QUICK`` in each script), ``--executor local|ray``, ``--workers N``, ``--dir DIR`` (default
``runs/experiments/<study>[-quick]``) and ``--set KEY=VALUE`` (sweep overrides as in ``ntkcv sweep``). A
larger data set from local files, e.g. MNIST::

    python -m experiments.data_quality --set base.data.name=mnist --set base.data.path=/data/mnist \\
        --set base.data.test_size=2000

(for ``time_evolution`` also replace ``n = all``, whose NTK on 60,000 points is out of reach:
``--set 'grid.data.train_size=[30, 100, 300, 1000]'``).
"""
