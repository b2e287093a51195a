"""Compile time of the monitor's program with XLA's default compile options and with ntkcv's quick CPU options (as
for the monitor in the loop, and for its background compile when asynchronous).

    python -m benchmarks.monitor_compile              # the default MLP, the CNN and the transformer configs
    python -m benchmarks.monitor_compile --repeats 5

A run's first firing compiles the monitor's program while the training step compiles, on the same cores, so its
compile time is part of the monitor's overhead on a first run. Each repeat is a fresh process (an empty in-memory
cache, no persistent cache) that builds the monitor of a config (its model, probes and CVs), lowers its program
once and compiles it three times: with none, with the options the monitor uses in the loop and with those it uses
in the background (:func:`ntkcv.ntk.compilation.quick_compile_options`), the first compile rotating among them from
repeat to repeat. Then it times 30 runs of each executable, in turn, and reads the CVs of all three. Prints a
markdown table (medians over repeats; CPU is the process's CPU time during the compile, as XLA compiles on more
than one thread) and writes ``benchmarks/results/monitor_compile-<machine>.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

CONFIGS = {"mlp": None, "cnn": "configs/cnn_digits.yaml", "transformer": "configs/transformer_digits.yaml"}
VARIANTS = ("default", "quick", "background")


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _child(name: str, first: str) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import ntkcv
    from ntkcv.config import load_config
    from ntkcv.data import load_dataset, probe_subset
    from ntkcv.ntk.compilation import quick_compile_options
    from ntkcv.train import _model_options
    from ntkcv.zoo import make_model

    config = load_config(CONFIGS[name], {})
    d = config.data
    data = load_dataset(d.name, path=d.path, train_size=d.train_size, test_size=d.test_size, seed=config.train.seed,
                        subset_seed=d.subset_seed, indices=d.indices)
    module = make_model(config.model.kind, num_outputs=data.num_classes, **_model_options(config))
    params = module.init(jax.random.key(config.train.seed), jnp.asarray(data.x_train[:1]))["params"]
    x, labels = probe_subset(data.x_train, data.y_train, d.probe_size, config.train.seed)
    measurement = ntkcv.make_measurement(lambda p, x: module.apply({"params": p}, x), cvs=config.monitor.cvs,
                                         num_classes=int(labels.max()) + 1)
    probe_sets = {"": {"inputs": jnp.asarray(x), "labels": jnp.asarray(labels)}}
    args = (params, probe_sets, measurement.init(params, probe_sets), jnp.int32(0))
    lowered = jax.jit(measurement.apply).lower(*args)  # the monitor's program, compiled here with either options
    options = {"default": {}, "quick": quick_compile_options(), "background": quick_compile_options(background=True)}
    result = {}
    for variant in (first, *(v for v in VARIANTS if v != first)):
        start, cpu = time.perf_counter(), _cpu_seconds()
        compiled = lowered.compile(compiler_options=options[variant])
        result[variant] = {"compile_seconds": time.perf_counter() - start, "compile_cpu_seconds": _cpu_seconds() - cpu,
                           "compiled_first": variant == first, "program": compiled, "runs": []}
    for _ in range(30):  # the executables take turns, so this machine's drift falls on all
        for variant in VARIANTS:
            start = time.perf_counter()
            jax.block_until_ready(result[variant]["program"](*args))
            result[variant]["runs"].append(time.perf_counter() - start)
    for r in result.values():
        values, _, _ = jax.device_get(r.pop("program")(*args))
        r.update(run_ms=1e3 * float(np.median(r.pop("runs"))), values={k: float(v) for k, v in values.items()})
    print(json.dumps(result))


def _run(name: str, first: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "benchmarks.monitor_compile", "--child", name, first],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=2, metavar=("CONFIG", "FIRST_VARIANT"))
    args = parser.parse_args()
    if args.child:
        _child(*args.child)
        return
    from benchmarks.machine import write_result

    runs = {name: {variant: [] for variant in VARIANTS} for name in CONFIGS}
    for repeat in range(args.repeats):
        for name in CONFIGS:
            for variant, result in _run(name, VARIANTS[repeat % len(VARIANTS)]).items():
                runs[name][variant].append(result)
    lines = ["| model | compile s, default / quick / background | compile CPU s, default / quick / background | "
             "run ms, default / quick / background | largest relative difference of a CV |", "|---|---|---|---|---|"]
    summary = {}
    for name, by_variant in runs.items():
        median = {variant: {key: statistics.median(r[key] for r in rs)
                            for key in ("compile_seconds", "compile_cpu_seconds", "run_ms")}
                  for variant, rs in by_variant.items()}
        default = by_variant["default"][0]["values"]
        difference = max(abs(by_variant[variant][0]["values"][k] - v) / max(abs(v), 1e-30)
                         for variant in VARIANTS for k, v in default.items())
        summary[name] = {**median, "largest_relative_difference": difference}
        cells = [" / ".join(f"{median[variant][key]:{form}}" for variant in VARIANTS)
                 for key, form in (("compile_seconds", ".3f"), ("compile_cpu_seconds", ".3f"), ("run_ms", ".2f"))]
        lines.append(f"| {name} | {' | '.join(cells)} | {difference:.1e} |")
    print("\n".join(lines))
    path = write_result("monitor_compile", {"repeats": args.repeats, "runs": runs, "summary": summary})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
