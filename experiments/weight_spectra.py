"""Study 4: weight-spectrum exponents α and α̂ at the end of training against the test accuracy.

The study reads the runs of the time-evolution sweep (study 1), which log ``weights/alpha`` and
``weights/alpha_weighted``: if ``--from DIR`` (default: time_evolution's folder for the same mode) holds a
finished time-evolution sweep, the script reports on it, training nothing; otherwise it runs that sweep
itself (``configs/experiments/time_evolution.yaml`` named ``weight_spectra``, with the same ``--quick``
overrides) in ``--dir``. The findings (:mod:`ntkcv.studies.weight_spectra`) give Spearman's ρ of α and α̂
with the final test accuracy per group of models and overall, with paired bootstrap 95% intervals; the
findings file holds study 1's findings too (both read the same runs).
"""

from __future__ import annotations

import json
import pathlib
import sys
from collections.abc import Sequence

from experiments import _common, time_evolution

QUICK = time_evolution.QUICK  # the quick time-evolution sweep


def reusable(sweep_dir: pathlib.Path) -> bool:
    """``sweep_dir`` holds a time-evolution sweep with its results table."""
    index = sweep_dir / "sweep.json"
    return (sweep_dir / "results.csv").is_file() and index.is_file() and \
        json.loads(index.read_text())["sweep"]["name"] == "time_evolution"


def main(argv: Sequence[str] | None = None) -> int:
    def reuse_option(parser):
        parser.add_argument("--from", dest="from_dir", type=pathlib.Path,
                            help="the time-evolution sweep to reuse (default: runs/experiments/time_evolution"
                                 "[-quick])")

    args = _common.parse(argv, "weight_spectra", __doc__, extra=reuse_option)
    from_dir = args.from_dir or pathlib.Path("runs/experiments") / f"time_evolution{'-quick' * args.quick}"
    if reusable(from_dir):
        print(f"weight_spectra: reusing the time-evolution sweep in {from_dir}", flush=True)
        _common.report(from_dir)
        return 0
    _common.run_and_report(_common.load("time_evolution", args, QUICK, {"name": "weight_spectra"}), args.dir, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
