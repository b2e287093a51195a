"""The ``ntkcv`` command line."""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
import traceback
import warnings
from typing import Any

import yaml

from ntkcv import __version__
from ntkcv.config import ConfigError, ConfigWarning, describe_yaml_error, load_config, read_yaml


def _demo(args: argparse.Namespace) -> int:
    """Empirical NTK of a tanh MLP on scikit-learn's bundled digits, with every implementation."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    from sklearn.datasets import load_digits

    import ntkcv

    digits = load_digits()
    x = jnp.asarray(digits.data[: args.probes] / 16.0, jnp.float32)
    module = nn.Sequential([nn.Dense(args.width), nn.tanh, nn.Dense(args.width), nn.tanh, nn.Dense(10)])
    model = ntkcv.from_linen(module, module.init(jax.random.key(args.seed), x))
    num_params = sum(leaf.size for leaf in jax.tree_util.tree_leaves(model.params))
    print(f"NTK of a 64-{args.width}-{args.width}-10 tanh MLP ({num_params:,} parameters) "
          f"on {x.shape[0]} digits probes, output-traced")
    reference = None
    for implementation in ["auto", "structured", "jacobian", "ntvp"]:
        kernel_fn = ntkcv.ntk_fn(model.apply_fn, implementation=implementation)
        kernel = kernel_fn(model.params, x).block_until_ready()  # compile
        start = time.perf_counter()
        kernel = kernel_fn(model.params, x).block_until_ready()
        seconds = time.perf_counter() - start
        kernel = np.asarray(kernel, np.float64)
        reference = kernel if reference is None else reference
        eigenvalues = np.clip(np.linalg.eigvalsh(kernel), 0, None)
        p = eigenvalues / eigenvalues.sum()
        entropy = float(-(p[p > 0] * np.log(p[p > 0])).sum())
        difference = np.abs(kernel - reference).max() / np.abs(reference).max()
        print(f"  {implementation:>10}: {seconds * 1e3:8.1f} ms   trace {np.trace(kernel):12.4f}   "
              f"entropy {entropy:.4f} (of ln N = {np.log(len(p)):.4f})   max rel. diff vs auto {difference:.1e}")
    return 0


def _train(args: argparse.Namespace) -> int:
    """Train as the config says (the embedded-digits MLP by default) with the NTK monitor."""
    from ntkcv.train import resolve_run_dir, train

    config = _load(load_config, args)
    run_dir = resolve_run_dir(config.output.dir, resume=args.resume)
    print(f"ntkcv train: {config.model.kind} on {config.data.name}, {config.train.steps} steps in {run_dir}\n"
          f"  watch it: tensorboard --logdir {run_dir / 'tensorboard'}", flush=True)
    result = train(config, resume=args.resume, run_dir=run_dir)
    print(f"done in {result['seconds']:.1f} s. TensorBoard: tensorboard --logdir {result['tensorboard']}   "
          f"HDF5: {result['hdf5']}")
    print("  " + "  ".join(f"{k}={v:.4g}" for k, v in result.items() if k.startswith("final/")))
    return 0


def _load(load: Any, args: argparse.Namespace) -> Any:
    """``load(args.config, overrides from --set)``, showing its config warnings as lines on stderr."""
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects KEY=VALUE (e.g. train.steps=200), got {item!r}")
        overrides[key] = read_yaml(value, f"--set {key}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConfigWarning)
        loaded = load(args.config, overrides)
    shown: set[str] = set()  # a sweep's runs repeat the warnings of their base
    for warning in caught:
        if not issubclass(warning.category, ConfigWarning):
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
        elif str(warning.message) not in shown:
            shown.add(str(warning.message))
            print(f"ntkcv {args.command}: warning: {warning.message}", file=sys.stderr)
    return loaded


def _sweep(args: argparse.Namespace) -> int:
    """Expand the sweep's grid into runs, train those not done yet, and write the results table."""
    import collections

    from ntkcv.sweep import expand, load_sweep, read_table, run_sweep

    sweep = _load(load_sweep, args)
    sweep_dir = pathlib.Path(args.dir or sweep.output_dir.format(name=sweep.name)).resolve()
    print(f"ntkcv sweep: {len(expand(sweep))} runs of {sweep.name!r} in {sweep_dir} ({args.executor})", flush=True)
    table = run_sweep(sweep, sweep_dir, executor=args.executor, workers=args.workers)
    counts = collections.Counter(row["status"] for row in read_table(table))
    print(f"results: {table}  ({', '.join(f'{count} {status}' for status, count in sorted(counts.items()))})")
    return 1 if counts["failed"] else 0


def _report(args: argparse.Namespace) -> int:
    """A sweep folder (with sweep.json): its studies' figures and findings.md; a run folder: the run report."""
    if (pathlib.Path(args.run_dir) / "sweep.json").is_file():
        from ntkcv.studies import make_sweep_report

        path, findings = make_sweep_report(args.run_dir)
        for study in findings:
            for claim in study.claims:
                print(f"{study.study}: {claim.verdict}: {claim.paper}")
        print(f"findings: {path}")
        return 0
    from ntkcv.report import make_report

    print(f"report: {make_report(args.run_dir)}")
    return 0


#: Errors of use, not of ntkcv: a bad config or argument (``ConfigError`` is a ``ValueError``), malformed YAML, a
#: file or folder that is missing, exists, is locked or cannot be written, a missing optional dependency.
EXPECTED_ERRORS = (ValueError, OSError, ImportError, yaml.YAMLError)


def main(argv: list[str] | None = None) -> int:
    """Run an ``ntkcv`` command; returns the exit status.

    An expected error (:data:`EXPECTED_ERRORS`) is one line ``ntkcv COMMAND: MESSAGE`` on stderr and status 2;
    Ctrl-C is one line and status 130; any other exception is a bug: its traceback, a line asking to report it
    and status 1.
    """
    parser = argparse.ArgumentParser(prog="ntkcv", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a model with the NTK monitor (default: MLP on digits)")
    train.add_argument("config", nargs="?", help="YAML config (default: configs/default.yaml's settings)")
    train.add_argument("--resume", action="store_true", help="continue the run in output.dir from its checkpoint")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set train.steps=200 (repeatable)")
    train.set_defaults(run=_train)
    sweep = commands.add_parser("sweep", help="train a grid of runs (resumable, in parallel) into one results table")
    sweep.add_argument("config", help="sweep YAML (see configs/sweeps/example.yaml)")
    sweep.add_argument("--executor", choices=["local", "ray"], default="local",
                       help="local processes (default) or a Ray cluster (RAY_ADDRESS, else a local one)")
    sweep.add_argument("--workers", type=int, help="parallel local runs (default: the sweep's workers)")
    sweep.add_argument("--dir", help="the sweep's folder (default: the sweep's output_dir)")
    sweep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a sweep value, e.g. --set base.train.steps=50 --set grid.train.seed=[0,1]")
    sweep.set_defaults(run=_sweep)
    report = commands.add_parser("report", help="figures and a markdown summary of a run directory, or the "
                                 "findings of a study's sweep directory")
    report.add_argument("run_dir")
    report.set_defaults(run=_report)
    demo = commands.add_parser("demo", help="compute the NTK of an MLP on the embedded digits data")
    demo.add_argument("--probes", type=int, default=256, help="number of probe inputs (default 256)")
    demo.add_argument("--width", type=int, default=128, help="hidden width (default 128)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)
    args = parser.parse_args(argv)
    if getattr(args, "probes", 1) < 1:
        parser.error(f"--probes must be a positive number, got {args.probes}")
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print(f"ntkcv {args.command}: interrupted", file=sys.stderr)
        return 130
    except EXPECTED_ERRORS as error:
        message = describe_yaml_error(error) if isinstance(error, yaml.YAMLError) else " ".join(str(error).split())
        print(f"ntkcv {args.command}: {message or type(error).__name__}", file=sys.stderr)
        return 2
    except Exception:
        traceback.print_exc()
        print(f"ntkcv {args.command}: this is a bug in ntkcv {__version__}; please report it with the "
              "traceback above", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
