"""Overhead of the NTK monitor on the default digits run: the same run (same seed) with and without it.

    python -m benchmarks.monitor_overhead            # the default run: 1000 steps, NTK every 50 steps
    python -m benchmarks.monitor_overhead --quick    # 300 steps
    python -m benchmarks.monitor_overhead --modes off,on --caches cold --repeats 1   # the default monitor only

The monitored run computes entropy and trace of the 256-probe output-traced NTK every 50 steps (the
issue's cadence), in a background thread (``monitor.asynchronous``, the default of ``ntkcv train``) and,
for comparison, inside the loop; a fourth run has everything on: two probe sets of 256 (train and test), drift,
velocity and the per-layer kernels' trace share and entropy. All runs write the training scalars to TensorBoard
and HDF5. Each mode runs
twice over: *cold*, with an empty compilation cache (a model and shapes run for the first time on this
machine: everything is compiled), and *warm*, with JAX's persistent compilation cache filled by an earlier,
uncounted run of the same mode (what ``ntkcv train`` does on a rerun, and in a sweep after its first run).
Each run is its own subprocess (peak RSS is its own). In each repeat a cache's three arms run back to back, in
reversed order every other repeat, and an arm's overhead is the median over ``--repeats`` of its ratio to the run
without the monitor in the same repeat (this machine's load drifts, so adjacent runs compare best), with a 95 %
bootstrap interval of that median; the same for the whole ``train()`` call, set-up included (where an asynchronous
monitor compiles its program while the rest is set up). Prints a markdown table and writes
``benchmarks/results/monitor_overhead-<machine>.json`` (``monitor_overhead-<steps>-<machine>.json`` for other
``--steps``).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile

import numpy as np

MODES = {"off": "without monitor", "on": "with monitor, asynchronous (default)",
         "sync": "with monitor, in the loop (monitor.asynchronous=false)",
         "full": "asynchronous, train and test probes, drift, velocity, per-layer CVs"}
#: Monitor settings per mode: one probe set and its entropy and trace (the issue's run), or everything on.
SETTINGS = {"off": {"monitor.enabled": False}, "on": {}, "sync": {"monitor.asynchronous": False},
            "full": {"monitor.probe_sets": ["train", "test"], "monitor.drift": True, "monitor.layers": True}}
CACHES = ("cold", "warm")


def _child(mode: str, steps: int, cache: str) -> None:
    import time

    from benchmarks.machine import peak_rss_bytes
    from ntkcv.config import load_config
    from ntkcv.train import train

    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(None, {"train.steps": steps, "monitor.cvs": ["entropy", "trace"],
                                    "monitor.weight_metrics": False, "monitor.probe_sets": ["train"],
                                    "monitor.drift": False, **SETTINGS[mode], "output.progress": False,
                                    "output.dir": tmp, "output.compilation_cache": cache or f"{tmp}/cache"})
        start = time.perf_counter()
        result = train(config)
        seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "train_seconds": result["seconds"], "peak_rss_bytes": peak_rss_bytes(),
                      "test_accuracy": result["final/test_accuracy"]}))


def _run(mode: str, steps: int, cache: str = "") -> dict:
    done = subprocess.run([sys.executable, "-m", "benchmarks.monitor_overhead", "--child", mode, "--steps", str(steps),
                           "--cache", cache], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def median_interval(values: list[float], *, draws: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """A 95 % bootstrap interval of the median of ``values`` (percentiles of the medians of resamples)."""
    rng = np.random.default_rng(seed)
    medians = np.median(rng.choice(np.asarray(values), size=(draws, len(values))), axis=1)
    low, high = np.percentile(medians, [2.5, 97.5])
    return float(low), float(high)


def _overheads(runs: dict[str, dict[str, list[dict]]], timer: str) -> dict:
    """Per cache and mode: the ratios of ``timer`` to the run without the monitor in the same repeat, minus 1."""
    return {cache: {mode: [r[timer] / off[timer] - 1 for r, off in zip(rs, by_mode["off"], strict=True)]
                    for mode, rs in by_mode.items() if mode != "off"} for cache, by_mode in runs.items()}


def summarise(runs: dict[str, dict[str, list[dict]]]) -> dict:
    """Median seconds per arm, and each mode's overhead as the median over repeats of its ratio to the run without
    the monitor made just before it (adjacent runs share the machine's load), with the range of those ratios and a
    95 % bootstrap interval of their median: of the training loop (``overhead``) and of the whole ``train()`` call,
    set-up included (``whole_overhead``; the monitor's program compiles during the set-up)."""
    median = {cache: {mode: statistics.median(r["train_seconds"] for r in rs) for mode, rs in by_mode.items()}
              for cache, by_mode in runs.items()}
    summary: dict = {"median_seconds": median}
    for prefix, timer in (("", "train_seconds"), ("whole_", "seconds")):
        ratios = _overheads(runs, timer)
        summary[f"{prefix}overhead"] = {cache: {mode: statistics.median(rs) for mode, rs in by_mode.items()}
                                        for cache, by_mode in ratios.items()}
        summary[f"{prefix}overhead_interval"] = {cache: {mode: median_interval(rs) for mode, rs in by_mode.items()}
                                                 for cache, by_mode in ratios.items()}
        summary[f"{prefix}overhead_per_repeat"] = ratios
    return summary


def table(summary: dict, runs: dict[str, dict[str, list[dict]]]) -> str:
    lines = ["| compilation cache | run (NTK every 50 steps, 256 probes) | training loop s (median) | overhead (median "
             "[min, max] over repeats) | whole train() s (median) | whole train() overhead | peak RSS GB | "
             "test accuracy |", "|---|---|---|---|---|---|---|---|"]

    def overhead(prefix: str, cache: str, mode: str) -> str:
        ratios = summary[f"{prefix}overhead_per_repeat"][cache].get(mode)
        if ratios is None:
            return "–"
        return f"{summary[f'{prefix}overhead'][cache][mode]:.1%} [{min(ratios):.1%}, {max(ratios):.1%}]"

    for cache, by_mode in runs.items():
        for mode, rs in by_mode.items():
            lines.append(f"| {cache} | {MODES[mode]} | {summary['median_seconds'][cache][mode]:.2f} | "
                         f"{overhead('', cache, mode)} | {statistics.median(r['seconds'] for r in rs):.2f} | "
                         f"{overhead('whole_', cache, mode)} | {max(r['peak_rss_bytes'] for r in rs) / 1e9:.2f} | "
                         f"{rs[0]['test_accuracy']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=list(MODES))
    parser.add_argument("--cache", default="", help="(child) compilation cache directory; empty: a fresh one")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--modes", default=",".join(MODES), help="comma list of arms (off is always run)")
    parser.add_argument("--caches", default=",".join(CACHES), help="comma list of compilation caches: cold, warm")
    parser.add_argument("--output", help="result JSON (default benchmarks/results/monitor_overhead-...json)")
    args = parser.parse_args()
    steps = 300 if args.quick else args.steps
    if args.child:
        _child(args.child, steps, args.cache)
        return
    from benchmarks.machine import write_result

    modes = ["off", *(mode for mode in MODES if mode != "off" and mode in args.modes.split(","))]
    selected_caches = [cache for cache in CACHES if cache in args.caches.split(",")]
    if set(args.modes.split(",")) - set(MODES) or not selected_caches or set(args.caches.split(",")) - set(CACHES):
        raise ValueError(f"--modes must be a comma list of {', '.join(MODES)} and --caches of {', '.join(CACHES)}, "
                         f"got {args.modes!r} and {args.caches!r}")
    runs: dict[str, dict[str, list[dict]]] = {cache: {mode: [] for mode in modes} for cache in selected_caches}
    with tempfile.TemporaryDirectory() as caches:
        warm = {mode: str(pathlib.Path(caches) / mode) for mode in modes}
        for mode in modes if "warm" in runs else ():
            _run(mode, steps, warm[mode])  # fills this mode's cache; not counted
        for repeat in range(args.repeats):
            for cache in runs:  # a cache's arms back to back, in reversed order every other repeat (drift cancels)
                for mode in modes[:: 1 if repeat % 2 == 0 else -1]:
                    runs[cache][mode].append(_run(mode, steps, warm[mode] if cache == "warm" else ""))
    summary = summarise(runs)
    print(table(summary, runs))
    for cache in runs:
        for prefix, what in (("", "training loop"), ("whole_", "whole train()")):
            overhead, interval = summary[f"{prefix}overhead"][cache], summary[f"{prefix}overhead_interval"][cache]
            arms = ", ".join(f"{overhead[mode]:.1%} [{interval[mode][0]:.1%}, {interval[mode][1]:.1%}] {MODES[mode]}"
                             for mode in modes[1:])
            print(f"overhead of the monitor, {what} ({steps} steps, {cache}; median, 95 % interval of the median): "
                  f"{arms}")
    suffix = "-quick" if args.quick else "" if steps == 1000 else f"-{steps}"
    path = write_result(f"monitor_overhead{suffix}",
                        {"steps": steps, "repeats": args.repeats, "runs": runs, **summary}, args.output)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
