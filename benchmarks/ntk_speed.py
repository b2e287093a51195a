"""Empirical-NTK speed: every ntkcv implementation against neural-tangents 0.6.5 on reference models.

Models: the peer's reference MLP 784-512-512-512-10 (tanh) and CNN (conv 32, conv 64, 3x3 'SAME', each + relu +
2x2 average pool; dense 128 + relu; dense 10) on 28x28x1 inputs, and the realistic ``resnet18`` (CIFAR stem,
BatchNorm in eval mode, 11.2M parameters) and ``vit_tiny`` (DeiT-Ti on 4x4 patches, 5.4M) on 32x32x3 inputs
(``benchmarks/reference_models.py``). For each model, N and mode (output-traced, or full ``trace_axes=()``) every
implementation runs in its own subprocess: compiled ahead of time, then the median wall time of ``--reps`` calls,
and peak RSS from ``getrusage``. Each run has a timeout and an address-space limit: one that cannot finish is
recorded as "timeout" or "out of memory" with the FLOP estimate of ntkcv's cost model (for neural-tangents, that of
the same method: 1 jacobian, 2 ntvp, 3 structured). A (model, implementation) that timed out or ran out of memory
is skipped at larger N, and in the full mode at the same N. neural-tangents runs in its own environment
(``benchmarks/peer_kernel.py``) on the same parameters and inputs (.npz); it *averages* over traced axes, so its
traced kernels are multiplied by 10 before comparing.

Usage::

    python -m benchmarks.ntk_speed --quick            # N = 32, a few minutes
    python -m benchmarks.ntk_speed                    # N in {64, 256, 1024}
    python -m benchmarks.ntk_speed --models resnet18,vit_tiny --ns 64,256 --timeout 64=300,256=600
    python -m benchmarks.ntk_speed --models mlp --modes traced --ns 4096 \
        --implementations structured --no-peer

Writes ``benchmarks/results/ntk_speed-<machine>.json`` (``ntk_speed-realistic-<machine>.json`` with ``resnet18`` or
``vit_tiny``) and prints a markdown table.

With ``--precisions`` (e.g. ``highest,tensorfloat32``) each model, N and mode instead runs in this process, no peer:
the jitted kernel is timed at each matmul precision, and its block of the first ``--reference-block`` samples is
compared with the same block computed in float64 (implementation ``jacobian``, under ``jax.enable_x64``): the
full N x N kernel in float64 would cost as much again, the block's error is that of its entries. ``--widths``
shrinks resnet18's stages for a smoke run::

    python -m benchmarks.ntk_speed --models mlp --ns 16384 --modes traced --precisions highest,tensorfloat32
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.machine import describe, machine_tag, peak_rss_bytes
from benchmarks.reference_models import (
    CNN_SPEC,
    INPUT_SHAPES,
    MLP_SPEC,
    PEER_PYTHON,
    RESNET18_SPEC,
    VIT_TINY_SPEC,
    build,
    peer_env,
)

HERE = Path(__file__).resolve().parent
SPECS = {"mlp": MLP_SPEC, "cnn": CNN_SPEC, "resnet18": RESNET18_SPEC, "vit_tiny": VIT_TINY_SPEC}
#: ``--tiny``: the realistic models shrunk for smoke runs
TINY_SPECS = {"resnet18": {**RESNET18_SPEC, "widths": [4, 4, 4, 4]},
              "vit_tiny": {**VIT_TINY_SPEC, "dim": 16, "depth": 1, "heads": 2, "mlp": 32}}
MODES = {"traced": "-1", "full": ""}
OUTPUTS = 10  # every model has 10 outputs
#: the ntkcv implementation whose cost model estimates each neural-tangents implementation's
PEER_METHODS = {"1": "jacobian", "2": "ntvp", "3": "structured"}
OUT_OF_MEMORY = ("RESOURCE_EXHAUSTED", "Out of memory", "MemoryError", "bad_alloc")


def write_inputs(workdir: Path, model: str, spec: dict, n: int, seed: int = 0) -> tuple[Path, Path, Path]:
    """Parameters (flax init, PRNGKey(seed)), inputs and spec as the children read them."""
    import jax
    from flax.traverse_util import flatten_dict

    spec_path, x_path = workdir / f"{model}.json", workdir / f"{model}-{n}-x.npz"
    p_path = workdir / f"{model}-p.npz"
    spec_path.write_text(json.dumps(spec))
    x = np.asarray(jax.random.normal(jax.random.key(seed + 1), (n, *INPUT_SHAPES[spec["kind"]])), np.float32)
    np.savez(x_path, x=x)
    if not p_path.exists():
        variables = build(spec).init(jax.random.key(seed), x[:1])
        np.savez(p_path, **{"/".join(k): np.asarray(v) for k, v in flatten_dict(variables).items()})
    return spec_path, x_path, p_path


def load(spec_path, x_path, p_path):
    """The module, its variables and the inputs that :func:`write_inputs` wrote."""
    import jax.numpy as jnp
    from flax.traverse_util import unflatten_dict

    variables = unflatten_dict({tuple(k.split("/")): jnp.asarray(v) for k, v in np.load(p_path).items()})
    return build(json.loads(Path(spec_path).read_text())), variables, jnp.asarray(np.load(x_path)["x"])


def trace_axes_of(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in text.split(",") if t.strip())


# --------------------------------------------------------------------------- child: one run, ntkcv or the peer


def child(args) -> None:
    """Compile one implementation's jitted kernel, run it ``reps`` times (at least once); print the median seconds,
    the compilation's, peak RSS and (``auto``) the implementation run."""
    if args.memory_limit:  # allocations past it fail (XLA: RESOURCE_EXHAUSTED) instead of waking the OOM killer
        limit = int(args.memory_limit * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import jax

    module, variables, x = load(args.spec, args.inputs, args.params)
    trace_axes = trace_axes_of(args.trace_axes)
    if args.side == "nt":
        from benchmarks.peer_kernel import nt_kernel_fn

        params = variables["params"]
        kernel_fn = nt_kernel_fn(module, variables, trace_axes=trace_axes, implementation=int(args.implementation))
    else:
        import ntkcv

        model = ntkcv.from_linen(module, variables)
        params = model.params
        kernel_fn = ntkcv.ntk_fn(model.apply_fn, trace_axes=trace_axes, implementation=args.implementation)

    with _auto_choices() as picked:  # compiled ahead of time: no warm-up run
        start = time.perf_counter()
        compiled = kernel_fn.lower(params, x).compile()
        compile_seconds = time.perf_counter() - start
    times = []
    for _ in range(args.reps):
        start = time.perf_counter()
        kernel = jax.block_until_ready(compiled(params, x))
        times.append(time.perf_counter() - start)
    np.save(args.out, np.asarray(kernel))
    result = {"seconds": statistics.median(times), "compile_seconds": compile_seconds,
              "peak_rss_mb": peak_rss_bytes() / 2**20}
    print(json.dumps(result | ({"picked": picked[0][0]} if picked else {})))


def run_child(side: str, impl: str, paths, trace_axes: str, reps: int, timeout: float, memory_limit: float,
              out: Path) -> dict:
    """One :func:`child` in its own process (the peer's python for ``side == "nt"``)."""
    python = str(PEER_PYTHON) if side == "nt" else sys.executable
    spec, x_path, p_path = paths
    cmd = [python, "-m", "benchmarks.ntk_speed", "--child", "--side", side, "--implementation", impl,
           "--spec", str(spec), "--inputs", str(x_path), "--params", str(p_path), f"--trace-axes={trace_axes}",
           "--reps", str(reps), "--memory-limit", str(memory_limit), "--out", str(out)]
    env = peer_env() if side == "nt" else {**os.environ, "JAX_PLATFORMS": "cpu"}
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=HERE.parent)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "timeout_s": timeout}
    result = _parse(proc, memory_limit)
    return result | {"process_seconds": time.perf_counter() - start}  # start-up and compilation included


def _parse(proc: subprocess.CompletedProcess, memory_limit: float) -> dict:
    """A finished child's result: its JSON line, or why it has none (out of memory, a crash)."""
    if proc.returncode != 0:
        if proc.returncode == -9 or any(sign in proc.stderr for sign in OUT_OF_MEMORY):
            return {"status": "out of memory", "memory_limit_gb": memory_limit}
        killed = [f"killed by {signal.Signals(-proc.returncode).name}"] if proc.returncode < 0 else []
        return {"status": "failed", "error": proc.stderr.strip().splitlines()[-1:] + killed}
    try:
        return {"status": "ok", **json.loads(proc.stdout.strip().splitlines()[-1])}
    except (ValueError, IndexError) as error:  # a benchmark row must survive one bad run
        return {"status": "failed", "error": [f"{type(error).__name__}: {error}", proc.stderr[-300:]]}


def estimated_flops(paths, trace_axes: str) -> tuple[str, dict[str, float]]:
    """The implementation ``auto`` picks and ntkcv's FLOP estimate of each (its cost model, from tracing only)."""
    import jax

    import ntkcv

    module, variables, x = load(*paths)
    model = ntkcv.from_linen(module, variables)
    kernel_fn = ntkcv.ntk_fn(model.apply_fn, trace_axes=trace_axes_of(trace_axes), implementation="auto")
    with _auto_choices() as picked:
        jax.eval_shape(kernel_fn, model.params, x)
    choice, estimates = picked[0]
    return choice, {impl: float(flops) for impl, flops in estimates.items()}


def relative_difference(actual: np.ndarray, expected: np.ndarray) -> float:
    """``max |a - b| / max |b|``."""
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


# --------------------------------------------------------------------------- one model at several matmul precisions


class _AutoChoices(logging.Handler):
    """Collects what ``ntk_fn(implementation="auto")`` picks and each implementation's estimated FLOPs (its debug
    log, at trace time)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.picked: list[tuple[str, dict[str, str]]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("auto implementation"):
            self.picked.append(record.args)


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
                                        "implementation": picked[0][0] if picked else implementation}
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
        spec = spec_of(model, args)
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


def spec_of(model: str, args) -> dict:
    """``model``'s spec, shrunk by ``--tiny`` or ``--widths`` (resnet18's stage widths)."""
    spec = dict(TINY_SPECS.get(model, SPECS[model]) if args.tiny else SPECS[model])
    if args.widths and model == "resnet18":
        spec["widths"] = [int(w) for w in args.widths.split(",")]
    return spec


def timeouts(text: str, ns: list[int]) -> dict[int, float]:
    """``--timeout``: seconds for every N (``300``) or per N (``64=300,256=600``)."""
    if "=" not in text:
        return dict.fromkeys(ns, float(text))
    per_n = {int(n): float(s) for n, s in (item.split("=") for item in text.split(","))}
    missing = [n for n in ns if n not in per_n]
    if missing:
        raise ValueError(f"--timeout gives no seconds for N = {missing}: {text!r}")
    return per_n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="N = 32 only, 1 repetition, 40 s timeout")
    parser.add_argument("--tiny", action="store_true", help="resnet18 and vit_tiny shrunk (TINY_SPECS), for smoke runs")
    parser.add_argument("--models", default="mlp,cnn", help=f"some of {', '.join(SPECS)}")
    parser.add_argument("--modes", default="traced,full")
    parser.add_argument("--ns", default="64,256,1024")
    parser.add_argument("--implementations", default=None, help="ntkcv implementations (default: all)")
    parser.add_argument("--peer-implementations", default="1,2,3")
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--timeout", default="300", help="seconds per run before 'timeout', or per N: 64=300,256=600")
    parser.add_argument("--memory-limit", type=float, default=None,
                        help="GB of address space per run before 'out of memory' (default 60%% of RAM)")
    parser.add_argument("--max-flops", type=float, default=None,
                        help="skip runs whose estimated FLOPs exceed this (recorded with the estimate)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole run: runs that would start later are skipped")
    parser.add_argument("--output", default=None, help="result JSON (default benchmarks/results/...)")
    parser.add_argument("--precisions", default=None,
                        help="matmul precisions, e.g. highest,tensorfloat32: time each in this process (see above)")
    parser.add_argument("--reference-block", type=int, default=1024,
                        help="with --precisions: samples in the float64 reference block (0: none)")
    parser.add_argument("--widths", default=None, help="resnet18 stage widths (default 64,...,512)")
    # child mode (one run in its own process)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--side", default="ntkcv", choices=("ntkcv", "nt"), help=argparse.SUPPRESS)
    for name in ("--implementation", "--spec", "--inputs", "--params", "--trace-axes", "--out"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if args.reps < 1:
        parser.error(f"--reps must be at least 1, got {args.reps}")
    if args.precisions:
        return precision_rows(args)

    import ntkcv

    if args.quick:
        args.ns, args.reps, args.timeout = "32", 1, "40"
    models, ns = args.models.split(","), [int(v) for v in args.ns.split(",")]
    seconds = timeouts(args.timeout, ns)
    memory_limit = args.memory_limit or round(0.6 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    impls = args.implementations.split(",") if args.implementations else [i.value for i in ntkcv.Implementation]
    peer_ok = not args.no_peer and PEER_PYTHON.exists()
    peer_impls = args.peer_implementations.split(",") if peer_ok else []
    load_start = os.getloadavg()
    info = describe() | {"load_average_at_start": load_start, "memory_limit_gb": memory_limit}
    if load_start[0] > 3:
        info["note"] = (f"shared machine: 1-minute load average {load_start[0]:.1f} at the start (other jobs on the "
                        f"{os.cpu_count()} cores), so timings are slower and noisier than on an idle machine")
    name = "ntk_speed-realistic" if set(models) & set(TINY_SPECS) else "ntk_speed"
    output = Path(args.output) if args.output else HERE / "results" / f"{name}-{machine_tag()}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    rows, failed = [], {}  # (model, side, implementation) -> [(N, mode, status)] of runs that did not finish
    report = {"machine": info, "command": " ".join(sys.argv), "rows": rows}
    deadline = time.monotonic() + (args.budget or float("inf"))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for n in ns:  # every model at the smallest N first: a spent budget leaves the largest out
            for model in models:
                paths = write_inputs(work, model, spec_of(model, args), n)
                for mode in args.modes.split(","):
                    runs = [("ntkcv", impl) for impl in impls] + [("nt", impl) for impl in peer_impls]
                    rows.append(measure_row(model, n, mode, paths, runs, failed, args, seconds[n], memory_limit,
                                            deadline))
                    info["load_average_at_end"] = load = os.getloadavg()
                    info["max_load_average_1min"] = max(info.get("max_load_average_1min", 0.0), load[0])
                    output.write_text(json.dumps(report, indent=1))  # after every row: a stopped run keeps its rows
    print(markdown(report, impls, peer_impls))
    print(f"\nwritten to {output}", file=sys.stderr)


def measure_row(model: str, n: int, mode: str, paths, runs: list[tuple[str, str]], failed: dict, args,
                timeout: float, memory_limit: float, deadline: float) -> dict:
    """One row of the table: each (side, implementation) of ``runs`` on ``model``'s inputs ``paths``, unless
    :func:`_skip_reason` (``failed``, updated here) or the ``deadline`` (``time.monotonic``) rules it out; each run's
    timeout is the smaller of ``timeout`` and the time left."""
    spec_path, _, _ = paths
    picks, estimates = estimated_flops(paths, MODES[mode])
    row = {"model": model, "spec": json.loads(spec_path.read_text()), "n": n, "mode": mode, "auto_picks": picks,
           "estimated_flops": estimates, "ntkcv": {}, "nt": {}}
    kernels = {}
    for side, impl in runs:
        flops = estimates[PEER_METHODS[impl] if side == "nt" else picks if impl == "auto" else impl]
        reason = _skip_reason(failed.get((model, side, impl), []), n, mode, flops, args.max_flops)
        picked = row["ntkcv"].get(picks, {}).get("status", "ok") if side == "ntkcv" and impl == "auto" else "ok"
        if picked != "ok":  # auto runs the same program as the implementation it picks
            reason = picked if picked.startswith("skipped") else f"skipped (picks {picks}: {picked})"
        left = deadline - time.monotonic()
        if reason is None and left < 1:
            reason = "skipped (time budget spent)"
        if reason:
            result = {"status": reason}
        else:
            out = paths[0].parent / f"{side}-{impl}.npy"
            result = run_child(side, impl, paths, MODES[mode], args.reps, min(timeout, left), memory_limit, out)
            if result["status"] == "timeout" and left < timeout:
                result["status"] = "timeout (time budget spent)"
            if result["status"] != "ok":
                failed.setdefault((model, side, impl), []).append((n, mode, result["status"]))
            else:  # the peer averages over the traced output axis: scale to ntkcv's sum
                kernels[side, impl] = np.load(out) * (OUTPUTS if side == "nt" and MODES[mode] else 1)
        row[side][impl] = result | {"estimated_flops": flops}
        print(f"{model} N={n} {mode} {side} {impl}: {_cell(row[side][impl])}", file=sys.stderr, flush=True)
    _summarise(row, kernels)
    return row


def _skip_reason(failures: list[tuple[int, str, str]], n: int, mode: str, flops: float,
                 max_flops: float | None) -> str | None:
    """Why a run is not worth starting: it failed (timed out, ran out of memory, crashed) at this or a smaller N, in
    this mode or the cheaper traced one; or its estimated FLOPs exceed ``max_flops``."""
    for n0, mode0, status in failures:
        if n0 <= n and mode0 in (mode, "traced"):
            return f"skipped ({status} at N = {n0}, {mode0})"
    if max_flops is not None and flops > max_flops:
        return f"skipped (estimate over {max_flops:.0e} FLOPs)"
    return None


def _summarise(row, kernels) -> None:
    """Best seconds of each side, their ratio, and each kernel's ``relative_difference`` from neural-tangents'
    (implementation 3, else 1, else 2; without the peer, from the first ntkcv kernel)."""
    ok = lambda side: {i: r["seconds"] for i, r in row[side].items() if r["status"] == "ok"}  # noqa: E731
    ours, theirs = ok("ntkcv"), ok("nt")
    row["ntkcv_best"] = min(ours.items(), key=lambda kv: kv[1]) if ours else None
    row["nt_best"] = min(theirs.items(), key=lambda kv: kv[1]) if theirs else None
    row["ratio"] = row["ntkcv_best"][1] / row["nt_best"][1] if ours and theirs else None
    key = next((("nt", i) for i in ("3", "1", "2") if ("nt", i) in kernels), next(iter(kernels), None))
    row["reference"] = None if key is None else " ".join(key)
    for side, impl in kernels:
        row[side][impl]["rel_diff"] = relative_difference(kernels[side, impl], kernels[key])
    row["max_rel_diff"] = max((relative_difference(k, kernels[key]) for k in kernels.values()), default=None)
    best = row["ntkcv_best"]
    row["best_peak_rss_mb"] = row["ntkcv"][best[0]]["peak_rss_mb"] if best else None


def _cell(result) -> str:
    if result["status"] != "ok":
        flops = result.get("estimated_flops")
        return result["status"] + (f" ({flops:.1e} FLOPs est.)" if flops is not None else "")
    seconds = result["seconds"]
    text = f"{seconds * 1e3:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"
    return text + (f" ({result['peak_rss_mb']:.0f} MB)" if "peak_rss_mb" in result else "")


def markdown(report, impls, peer_impls) -> str:
    m = report["machine"]
    lines = [f"{m['cpu']}, {m['cores']} cores, JAX {m['jax']} ({m['device']}); median wall time, "
             "(peak RSS of the process)", ""]
    header = ["model", "mode", "N", *(f"ntkcv {i}" for i in impls), "auto picks", *(f"nt {i}" for i in peer_impls),
              "ntkcv best / nt best", "max rel. diff"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in report["rows"]:
        cells = [row["model"], row["mode"], str(row["n"])]
        cells += [_cell(row["ntkcv"][i]) for i in impls] + [row.get("auto_picks", "-")]
        cells += [_cell(row["nt"][i]) for i in peer_impls]
        cells.append(f"{row['ratio']:.2f}x" if row["ratio"] is not None else "-")
        cells.append(f"{row['max_rel_diff']:.1e}" if row["max_rel_diff"] is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
