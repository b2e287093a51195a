"""Overhead of the NTK monitor on the default digits run: the same run (same seed) with and without it.

    python -m benchmarks.monitor_overhead            # the default run: 1000 steps, NTK every 50 steps
    python -m benchmarks.monitor_overhead --quick    # 300 steps

The monitored run computes entropy and trace of the 256-probe output-traced NTK every 50 steps (the
issue's cadence), in a background thread (``monitor.asynchronous``, the default of ``ntkcv train``) and,
for comparison, inside the loop; all runs write the training scalars to TensorBoard and HDF5. Each mode runs
twice over: *cold*, with an empty compilation cache (a model and shapes run for the first time on this
machine: everything is compiled), and *warm*, with JAX's persistent compilation cache filled by an earlier,
uncounted run of the same mode (what ``ntkcv train`` does on a rerun, and in a sweep after its first run).
Each run is its own subprocess (peak RSS is its own); runs alternate, and the ratios use the medians of
``--repeats``. Prints a markdown table and writes ``benchmarks/results/monitor_overhead-<machine>.json``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile

MODES = {"off": "without monitor", "on": "with monitor, asynchronous (default)",
         "sync": "with monitor, in the loop (monitor.asynchronous=false)"}
CACHES = ("cold", "warm")


def _child(mode: str, steps: int, cache: str) -> None:
    import time

    from benchmarks.machine import peak_rss_bytes
    from ntkcv.config import load_config
    from ntkcv.train import train

    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(None, {"train.steps": steps, "monitor.enabled": mode != "off",
                                    "monitor.asynchronous": mode == "on",
                                    "monitor.cvs": ["entropy", "trace"], "monitor.weight_metrics": False,
                                    "output.progress": False, "output.dir": tmp,
                                    "output.compilation_cache": cache or f"{tmp}/cache"})
        start = time.perf_counter()
        result = train(config)
        seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "train_seconds": result["seconds"], "peak_rss_bytes": peak_rss_bytes(),
                      "test_accuracy": result["final/test_accuracy"]}))


def _run(mode: str, steps: int, cache: str = "") -> dict:
    done = subprocess.run([sys.executable, "-m", "benchmarks.monitor_overhead", "--child", mode, "--steps", str(steps),
                           "--cache", cache], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=list(MODES))
    parser.add_argument("--cache", default="", help="(child) compilation cache directory; empty: a fresh one")
    parser.add_argument("--steps", type=int, default=1000)
    args = parser.parse_args()
    steps = 300 if args.quick else args.steps
    if args.child:
        _child(args.child, steps, args.cache)
        return
    from benchmarks.machine import write_result

    runs: dict[str, dict[str, list[dict]]] = {cache: {mode: [] for mode in MODES} for cache in CACHES}
    with tempfile.TemporaryDirectory() as caches:
        warm = {mode: str(pathlib.Path(caches) / mode) for mode in MODES}
        for mode in MODES:
            _run(mode, steps, warm[mode])  # fills this mode's cache; not counted
        for _ in range(args.repeats):
            for mode in MODES:
                runs["cold"][mode].append(_run(mode, steps))
                runs["warm"][mode].append(_run(mode, steps, warm[mode]))
    median = {cache: {mode: statistics.median(r["train_seconds"] for r in rs) for mode, rs in by_mode.items()}
              for cache, by_mode in runs.items()}
    overhead = {cache: {mode: m[mode] / m["off"] - 1 for mode in MODES if mode != "off"} for cache, m in median.items()}
    print("| compilation cache | run (NTK every 50 steps, 256 probes) | training loop s (median) | overhead | "
          "whole process s | peak RSS GB | test accuracy |\n|---|---|---|---|---|---|---|")
    for cache in CACHES:
        for mode, label in MODES.items():
            rs = runs[cache][mode]
            print(f"| {cache} | {label} | {median[cache][mode]:.2f} | {overhead[cache].get(mode, 0.0):.1%} | "
                  f"{statistics.median(r['seconds'] for r in rs):.2f} | "
                  f"{max(r['peak_rss_bytes'] for r in rs) / 1e9:.2f} | {rs[0]['test_accuracy']:.4f} |")
    for cache in CACHES:
        print(f"\noverhead of the monitor ({steps} steps, {cache}): {overhead[cache]['on']:.1%} asynchronous, "
              f"{overhead[cache]['sync']:.1%} in the loop")
    path = write_result("monitor_overhead" + ("-quick" if args.quick else ""),
                        {"steps": steps, "repeats": args.repeats, "runs": runs, "median_seconds": median,
                         "overhead": overhead})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
