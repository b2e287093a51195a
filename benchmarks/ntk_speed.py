"""Empirical-NTK speed: every ntkcv implementation against neural-tangents 0.6.5 on its reference models.

Models (the peer's specs, ../shared/peer/nt_kernel.py): an MLP 784-512-512-512-10 (tanh) and a CNN
(conv 32, conv 64, 3x3 'SAME', each + relu + 2x2 average pool; dense 128 + relu; dense 10) on 28x28x1
inputs. For each model, N and mode (output-traced, or full ``trace_axes=()``) every implementation runs in
its own subprocess (median wall time of the jitted call after a warm-up, peak RSS from ``getrusage``),
with a per-run timeout. The peer runs in its own environment on the same parameters and inputs (.npz).
neural-tangents *averages* over traced axes, so its traced kernels are multiplied by 10 before comparing.

Usage::

    python -m benchmarks.ntk_speed --quick            # N = 32, a few minutes
    python -m benchmarks.ntk_speed                    # N in {64, 256, 1024}
    python -m benchmarks.ntk_speed --models mlp --modes traced --ns 4096 \
        --implementations structured --no-peer

Writes ``benchmarks/results/ntk_speed-<machine>.json`` and prints a markdown table.

With ``--precisions`` (e.g. ``highest,tensorfloat32``) each model, N and mode instead runs in this process, no peer:
the jitted kernel is timed at each matmul precision, and its block of the first ``--reference-block`` samples is
compared with the same block computed in float64 (implementation ``jacobian``, under ``jax.enable_x64``): the
full N x N kernel in float64 would cost as much again, the block's error is that of its entries. Models here also
include ``resnet18`` (32x32x3 inputs; ``--widths`` shrinks its stages for a smoke run)::

    python -m benchmarks.ntk_speed --models mlp --ns 16384 --modes traced --precisions highest,tensorfloat32
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.machine import describe, machine_tag, peak_rss_bytes
from benchmarks.reference_models import CNN_SPEC, INPUT_SHAPES, MLP_SPEC, PEER_DIR, PEER_PYTHON, RESNET18_SPEC, build

HERE = Path(__file__).resolve().parent
SPECS = {"mlp": MLP_SPEC, "cnn": CNN_SPEC, "resnet18": RESNET18_SPEC}
MODES = {"traced": "-1", "full": ""}
OUTPUTS = 10  # both models have 10 outputs


def write_inputs(workdir: Path, model: str, n: int, seed: int = 0) -> tuple[Path, Path, Path]:
    """Parameters (flax init, PRNGKey(seed)), inputs and spec as the peer reads them."""
    import jax
    from flax.traverse_util import flatten_dict

    spec_path, x_path = workdir / f"{model}.json", workdir / f"{model}-{n}-x.npz"
    p_path = workdir / f"{model}-p.npz"
    spec_path.write_text(json.dumps(SPECS[model]))
    x = np.asarray(jax.random.normal(jax.random.key(seed + 1), (n, *INPUT_SHAPES[model])), np.float32)
    np.savez(x_path, x=x)
    if not p_path.exists():
        variables = build(SPECS[model]).init(jax.random.key(seed), x[:1])
        np.savez(p_path, **{"/".join(k): np.asarray(v) for k, v in flatten_dict(variables).items()})
    return spec_path, x_path, p_path


# --------------------------------------------------------------------------- child: one ntkcv run


def child(args) -> None:
    import jax
    import jax.numpy as jnp
    from flax.traverse_util import unflatten_dict

    import ntkcv

    module = build(json.loads(Path(args.spec).read_text()))
    x = jnp.asarray(np.load(args.inputs)["x"])
    params = unflatten_dict({tuple(k.split("/")): jnp.asarray(v) for k, v in np.load(args.params).items()})
    model = ntkcv.from_linen(module, params)
    trace_axes = tuple(int(t) for t in args.trace_axes.split(",") if t.strip())
    kernel_fn = ntkcv.ntk_fn(model.apply_fn, trace_axes=trace_axes, implementation=args.implementation)

    start = time.perf_counter()
    kernel = jax.block_until_ready(kernel_fn(model.params, x))
    first = time.perf_counter() - start
    times = []
    for _ in range(args.reps):
        start = time.perf_counter()
        kernel = jax.block_until_ready(kernel_fn(model.params, x))
        times.append(time.perf_counter() - start)
    np.save(args.out, np.asarray(kernel))
    print(json.dumps({"seconds": statistics.median(times), "first_call_seconds": first,
                      "peak_rss_mb": peak_rss_bytes() / 2**20}))


def run_ntkcv(impl, spec, x_path, p_path, trace_axes, reps, timeout, out) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.ntk_speed", "--child", "--implementation", impl, "--spec", str(spec),
           "--inputs", str(x_path), "--params", str(p_path), f"--trace-axes={trace_axes}",
           "--reps", str(reps), "--out", str(out)]
    return _run(cmd, timeout, lambda stdout: json.loads(stdout.strip().splitlines()[-1]))


def run_peer(impl, spec, x_path, p_path, trace_axes, reps, timeout, out) -> dict:
    cmd = [str(PEER_PYTHON), str(PEER_DIR / "nt_kernel.py"), "--spec", str(spec), "--inputs", str(x_path),
           "--params", str(p_path), "--out", str(out), f"--trace-axes={trace_axes}", "--implementations", str(impl),
           "--reps", str(reps)]
    # the peer reports failures (e.g. out of memory) on stderr and leaves the kernel out
    def parse(stdout):
        saved = np.load(out)
        if f"ntk_{impl}" not in saved:
            return {"status": "failed"}
        np.save(str(out) + ".npy", saved[f"ntk_{impl}"])
        return {"seconds": float(saved[f"seconds_{impl}"])}

    return _run(cmd, timeout, parse)


def _run(cmd, timeout, parse) -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"status": "timeout"}
    if proc.returncode != 0:
        return {"status": "failed", "error": proc.stderr.strip().splitlines()[-1:] or [""]}
    try:
        result = parse(proc.stdout)
    except Exception as error:  # a benchmark row must survive one bad run
        return {"status": "failed", "error": [f"{type(error).__name__}: {error}", proc.stderr[-300:]]}
    return {"status": "ok", **result} if "status" not in result else result


def relative_difference(actual: np.ndarray, expected: np.ndarray) -> float:
    """``max |a - b| / max |b|``."""
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


# --------------------------------------------------------------------------- one model at several matmul precisions


class _AutoChoices(logging.Handler):
    """Collects the implementations ``ntk_fn(implementation="auto")`` picks (its debug log, at trace time)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.picked: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("auto implementation"):
            self.picked.append(record.args[0])


@contextlib.contextmanager
def _auto_choices():
    logger, handler = logging.getLogger("ntkcv.ntk"), _AutoChoices()
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield handler.picked
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def precision_row(spec: dict, n: int, *, mode: str, implementation: str, precisions: list[str], reference_block: int,
                  reps: int, on_partial=None) -> dict:
    """Median seconds (and first call, compilation included) of ``ntk_fn(..., precision=p)`` on N inputs for each
    matmul precision p, the implementation it ran, and each kernel's ``relative_difference`` from the float64 kernel
    (implementation ``jacobian``) on the block of the first ``reference_block`` samples (0: none).
    ``on_partial(row)`` is called once the timings are in, before the float64 reference."""
    import jax
    import jax.numpy as jnp

    import ntkcv

    module = build(spec)
    x = jax.random.normal(jax.random.key(1), (n, *INPUT_SHAPES[spec["kind"]]))
    variables = module.init(jax.random.key(0), x[:1])
    trace_axes = tuple(int(t) for t in MODES[mode].split(",") if t.strip())
    block = min(reference_block, n)
    row = {"model": spec["kind"], "spec": spec, "n": n, "mode": mode, "implementation": implementation,
           "reference": {"block": block, "dtype": "float64", "implementation": "jacobian"}, "precisions": {}}
    blocks, model = {}, ntkcv.from_linen(module, variables)
    for precision in precisions:
        kernel_fn = ntkcv.ntk_fn(model.apply_fn, trace_axes=trace_axes, implementation=implementation,
                                 precision=precision)
        with _auto_choices() as picked:
            start = time.perf_counter()
            kernel = jax.block_until_ready(kernel_fn(model.params, x))
            first = time.perf_counter() - start
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            kernel = jax.block_until_ready(kernel_fn(model.params, x))
            times.append(time.perf_counter() - start)
        blocks[precision] = np.asarray(kernel[:block, :block], np.float64)
        del kernel
        row["precisions"][precision] = {"seconds": statistics.median(times), "first_call_seconds": first,
                                        "implementation": picked[0] if picked else implementation}
        print(f"{spec['kind']} N={n} {mode} {precision}: {_cell(row['precisions'][precision] | {'status': 'ok'})} "
              f"({row['precisions'][precision]['implementation']})", file=sys.stderr, flush=True)
    row["peak_rss_mb"] = peak_rss_bytes() / 2**20
    if block == 0:
        return row
    if on_partial is not None:
        on_partial(row)
    start = time.perf_counter()
    with jax.enable_x64(True):
        model = ntkcv.from_linen(module, jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables))
        kernel_fn = ntkcv.ntk_fn(model.apply_fn, trace_axes=trace_axes, implementation="jacobian")
        reference = np.asarray(kernel_fn(model.params, jnp.asarray(x[:block], jnp.float64)))
    row["reference"]["seconds"] = time.perf_counter() - start
    for precision, kernel in blocks.items():
        row["precisions"][precision]["max_rel_error_vs_float64"] = relative_difference(kernel, reference)
    return row


def precision_rows(args) -> None:
    """``--precisions``: :func:`precision_row` for each model, N and mode; the JSON is rewritten after each step."""
    from benchmarks.machine import write_result

    implementation = args.implementations or "auto"
    if "," in implementation:
        raise ValueError(f"--implementations takes one implementation with --precisions, got {implementation!r}")
    rows, name = [], f"ntk_speed-precision-{args.models.replace(',', '-')}"
    save = lambda partial=None: write_result(  # noqa: E731
        name, {"command": " ".join(sys.argv), "rows": rows + ([partial] if partial else [])}, args.output)
    for model in args.models.split(","):
        spec = dict(SPECS[model])
        if args.widths and model == "resnet18":
            spec["widths"] = [int(w) for w in args.widths.split(",")]
        for n in [int(v) for v in args.ns.split(",")]:
            for mode in args.modes.split(","):
                rows.append(precision_row(spec, n, mode=mode, implementation=implementation,
                                          precisions=args.precisions.split(","), reference_block=args.reference_block,
                                          reps=args.reps, on_partial=save))
                path = save()
    for row in rows:
        for precision, result in row["precisions"].items():
            error = result.get("max_rel_error_vs_float64")
            print(f"| {row['model']} | {row['mode']} | {row['n']} | {precision} | {result['implementation']} | "
                  f"{_cell(result | {'status': 'ok'})} | {'-' if error is None else f'{error:.1e}'} |")
    print(f"\nwritten to {path}", file=sys.stderr)


# --------------------------------------------------------------------------- driver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="N = 32 only, 1 repetition, 40 s timeout")
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--modes", default="traced,full")
    parser.add_argument("--ns", default="64,256,1024")
    parser.add_argument("--implementations", default=None, help="ntkcv implementations (default: all)")
    parser.add_argument("--peer-implementations", default="1,2,3")
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per run before 'timeout'")
    parser.add_argument("--output", default=None, help="result JSON (default benchmarks/results/...)")
    parser.add_argument("--precisions", default=None,
                        help="matmul precisions, e.g. highest,tensorfloat32: time each in this process (see above)")
    parser.add_argument("--reference-block", type=int, default=1024,
                        help="with --precisions: samples in the float64 reference block (0: none)")
    parser.add_argument("--widths", default=None, help="with --precisions: resnet18 stage widths (default 64,...,512)")
    # child mode (one ntkcv run in its own process)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for name in ("--implementation", "--spec", "--inputs", "--params", "--trace-axes", "--out"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if args.precisions:
        return precision_rows(args)

    import ntkcv

    if args.quick:
        args.ns, args.reps, args.timeout = "32", 1, min(args.timeout, 40.0)
    impls = args.implementations.split(",") if args.implementations else [i.value for i in ntkcv.Implementation]
    peer_ok = not args.no_peer and PEER_PYTHON.exists()
    peer_impls = args.peer_implementations.split(",") if peer_ok else []
    info = describe()
    output = Path(args.output) if args.output else HERE / "results" / f"ntk_speed-{machine_tag()}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    rows, slow = [], set()  # (model, mode, implementation) that timed out at a smaller N are skipped
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for model in args.models.split(","):
            for n in [int(v) for v in args.ns.split(",")]:
                spec, x_path, p_path = write_inputs(work, model, n)
                for mode in args.modes.split(","):
                    row = {"model": model, "n": n, "mode": mode, "ntkcv": {}, "nt": {}}
                    kernels = {}
                    runs = [("ntkcv", impl, run_ntkcv) for impl in impls]
                    runs += [("nt", impl, run_peer) for impl in peer_impls]
                    for side, impl, runner in runs:
                        key = (model, mode, side, impl)
                        if key in slow:
                            row[side][impl] = {"status": "skipped (timed out at smaller N)"}
                            continue
                        out = work / (f"nt-{impl}.npz" if side == "nt" else f"ntkcv-{impl}.npy")
                        result = runner(impl, spec, x_path, p_path, MODES[mode], args.reps, args.timeout, out)
                        if result["status"] == "timeout":
                            slow.add(key)
                        if result["status"] == "ok":
                            # the peer averages over the traced output axis: scale to ntkcv's sum
                            scale = OUTPUTS if side == "nt" and mode == "traced" else 1
                            kernels[side, impl] = np.load(f"{out}.npy" if side == "nt" else out) * scale
                        row[side][impl] = result
                        print(f"{model} N={n} {mode} {side} {impl}: {_cell(result)}", file=sys.stderr,
                              flush=True)
                    _summarise(row, kernels)
                    rows.append(row)
                    report = {"machine": info, "command": " ".join(sys.argv), "rows": rows}
                    output.write_text(json.dumps(report, indent=1))  # after every row: a stopped run keeps its rows
    print(markdown(report, impls, peer_impls))
    print(f"\nwritten to {output}", file=sys.stderr)


def _summarise(row, kernels) -> None:
    ok = lambda side: {i: r["seconds"] for i, r in row[side].items() if r["status"] == "ok"}  # noqa: E731
    ours, theirs = ok("ntkcv"), ok("nt")
    row["ntkcv_best"] = min(ours.items(), key=lambda kv: kv[1]) if ours else None
    row["nt_best"] = min(theirs.items(), key=lambda kv: kv[1]) if theirs else None
    row["ratio"] = row["ntkcv_best"][1] / row["nt_best"][1] if ours and theirs else None
    reference = next((kernels["nt", i] for i in ("3", "1", "2") if ("nt", i) in kernels), None)
    if reference is None and kernels:
        reference = next(iter(kernels.values()))
    row["max_rel_diff"] = max((relative_difference(k, reference) for k in kernels.values()), default=None)
    best = row["ntkcv_best"]
    row["best_peak_rss_mb"] = row["ntkcv"][best[0]]["peak_rss_mb"] if best else None


def _cell(result) -> str:
    if result["status"] != "ok":
        return result["status"]
    seconds = result["seconds"]
    text = f"{seconds * 1e3:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"
    return text + (f" ({result['peak_rss_mb']:.0f} MB)" if "peak_rss_mb" in result else "")


def markdown(report, impls, peer_impls) -> str:
    m = report["machine"]
    lines = [f"{m['cpu']}, {m['cores']} cores, JAX {m['jax']} ({m['device']}); median wall time, "
             "(peak RSS of the ntkcv process)", ""]
    header = ["model", "mode", "N", *(f"ntkcv {i}" for i in impls), *(f"nt {i}" for i in peer_impls),
              "ntkcv best / nt best", "max rel. diff"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in report["rows"]:
        cells = [row["model"], row["mode"], str(row["n"])]
        cells += [_cell(row["ntkcv"][i]) for i in impls] + [_cell(row["nt"][i]) for i in peer_impls]
        cells.append(f"{row['ratio']:.2f}x" if row["ratio"] is not None else "-")
        cells.append(f"{row['max_rel_diff']:.1e}" if row["max_rel_diff"] is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
