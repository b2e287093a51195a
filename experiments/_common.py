"""What every experiment script does: parse its options, load its sweep, run it and write the report."""

from __future__ import annotations

import argparse
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import yaml

from ntkcv.studies import Findings, make_sweep_report
from ntkcv.sweep import SweepConfig, load_sweep, run_sweep

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs" / "experiments"
QUICK_TRAINING = {"base.train.steps": 100, "base.train.eval_every": 100, "base.monitor.every_steps": 10,
                  "base.output.checkpoint_every": 100}
"""The --quick modes' training: 100 steps, the NTK every 10 (11 points), the test accuracy at the end."""


def main(argv: Sequence[str] | None, study: str, description: str | None, quick: Mapping[str, Any]) -> int:
    """The whole script for a study whose sweep is its config as it stands: parse, load, run, report."""
    args = parse(argv, study, description)
    run_and_report(load(study, args, quick), args.dir, args)
    return 0


def parse(argv: Sequence[str] | None, study: str, description: str | None, *,
          extra: Callable[[argparse.ArgumentParser], Any] | None = None) -> argparse.Namespace:
    """The options every script takes (see :mod:`experiments`), and those ``extra(parser)`` adds; ``dir``
    defaults to the study's folder."""
    parser = argparse.ArgumentParser(prog=f"python -m experiments.{study}", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the small version the tests run (the QUICK overrides)")
    parser.add_argument("--executor", choices=("local", "ray"), default="local",
                        help="local processes (default) or Ray tasks (RAY_ADDRESS, else a local cluster)")
    parser.add_argument("--workers", type=int, help="parallel local runs (default: the sweep's workers)")
    parser.add_argument("--dir", type=pathlib.Path, help="the sweep's folder (default: runs/experiments/<study>"
                        "[-quick])")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a sweep value, e.g. --set base.train.steps=200 (repeatable)")
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    args.dir = args.dir or pathlib.Path("runs/experiments") / (f"{study}-quick" if args.quick else study)
    try:
        args.set = dict(_override(item) for item in args.set)
    except ValueError as error:
        parser.error(str(error))
    return args


def load(config: str, args: argparse.Namespace, quick: Mapping[str, Any], fixed: Mapping[str, Any] | None = None
         ) -> SweepConfig:
    """``configs/experiments/<config>.yaml`` with ``quick`` (under ``--quick``), ``fixed`` and ``--set`` applied."""
    return load_sweep(CONFIGS / f"{config}.yaml", {**(quick if args.quick else {}), **(fixed or {}), **args.set})


def run_and_report(sweep: SweepConfig, sweep_dir: pathlib.Path, args: argparse.Namespace,
                   before_report: Any = None) -> tuple[pathlib.Path, list[Findings]]:
    """Run ``sweep`` in ``sweep_dir``, call ``before_report(sweep_dir)`` if given, write the report and print it."""
    run_sweep(sweep, sweep_dir, executor=args.executor, workers=args.workers)
    if before_report is not None:
        before_report(sweep_dir)
    return report(sweep_dir)


def report(sweep_dir: pathlib.Path) -> tuple[pathlib.Path, list[Findings]]:
    """Write the sweep's figures and ``findings.md``, print the findings and return them."""
    path, findings = make_sweep_report(sweep_dir)
    print(path.read_text(), flush=True)
    return path, findings




def _override(item: str) -> tuple[str, Any]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ValueError(f"--set expects KEY=VALUE (e.g. base.train.steps=200), got {item!r}")
    return key, yaml.safe_load(value)
