"""Exact vs matrix-free NTK entropy and trace on the reference MLP (784-512-512-512-10, tanh).

Exact: build Θ with ``ntkcv.ntk_fn`` and take ``numpy.linalg.eigvalsh`` in float64. Matrix-free: the
operator ``ntkcv.ntk_operator`` with stochastic Lanczos quadrature (entropy) and Hutch++ (trace). Each
configuration runs in its own subprocess so that its peak RSS is its own.

    python -m benchmarks.cv_scale            # full: full NTK at N=2000 (N·K = 20,000), traced N=1024, 4096
    python -m benchmarks.cv_scale --quick    # a couple of minutes
    python -m benchmarks.cv_scale --rows full:100000 --matrix-free-only   # 10^6 x 10^6: no dense eigvalsh

Prints a markdown table and writes ``benchmarks/results/cv_scale-<machine>.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np

ROWS_FULL = [("full", 2000), ("traced", 1024), ("traced", 4096)]
ROWS_QUICK = [("full", 200), ("traced", 512)]


def _setup(n: int):
    import jax

    import ntkcv
    from benchmarks.reference_models import MLP_SPEC, build

    module = build(MLP_SPEC)
    x = jax.random.normal(jax.random.key(0), (n, 28, 28, 1))
    model = ntkcv.from_linen(module, module.init(jax.random.key(1), x[:1]))
    return model, x


def run_exact(kind: str, n: int) -> dict:
    import jax

    import ntkcv

    model, x = _setup(n)
    trace_axes = () if kind == "full" else (-1,)
    kernel_fn = ntkcv.ntk_fn(model.apply_fn, trace_axes=trace_axes)
    jax.block_until_ready(kernel_fn(model.params, x[:8]))  # compile a small shape first: not timed
    start = time.perf_counter()
    kernel = np.asarray(ntkcv.flatten_kernel(kernel_fn(model.params, x)), np.float64)
    build_seconds = time.perf_counter() - start
    eigenvalues = np.clip(np.linalg.eigvalsh(kernel), 0, None)
    seconds = time.perf_counter() - start
    p = eigenvalues / eigenvalues.sum()
    entropy = float(-(p[p > 0] * np.log(p[p > 0])).sum())
    return {"entropy": entropy, "trace": float(np.trace(kernel)), "seconds": seconds, "build_seconds": build_seconds}


def run_matrix_free(kind: str, n: int, num_probes: int, num_matvecs: int) -> dict:
    import jax

    import ntkcv
    from ntkcv.cv import entropy_slq, trace_hutchpp

    model, x = _setup(n)
    trace_axes = () if kind == "full" else (-1,)

    @jax.jit
    def estimate(params, x, key):
        op = ntkcv.ntk_operator(model.apply_fn, params, x, trace_axes=trace_axes, chunk_size=min(n, 1024))
        k1, k2 = jax.random.split(key)
        entropy = entropy_slq(op.matvec, k1, n=op.dim, num_probes=num_probes, num_matvecs=num_matvecs)
        trace = trace_hutchpp(op.matvec, k2, n=op.dim, num_matvecs=3 * num_probes)
        return entropy, trace

    start = time.perf_counter()
    compiled = estimate.lower(model.params, x, jax.random.key(0)).compile()
    compile_seconds = time.perf_counter() - start
    start = time.perf_counter()
    entropy, trace = jax.block_until_ready(compiled(model.params, x, jax.random.key(0)))
    seconds = time.perf_counter() - start
    return {"entropy": float(entropy.value), "entropy_stderr": float(entropy.stderr), "trace": float(trace.value),
            "trace_stderr": float(trace.stderr), "seconds": seconds, "compile_seconds": compile_seconds}


def _child(args) -> None:
    from benchmarks.machine import peak_rss_bytes

    if args.child == "exact":
        result = run_exact(args.kind, args.n)
    else:
        result = run_matrix_free(args.kind, args.n, args.probes, args.matvecs)
    print(json.dumps({**result, "peak_rss_bytes": peak_rss_bytes()}))


def _in_subprocess(method: str, kind: str, n: int, probes: int, matvecs: int, timeout: float) -> dict:
    command = [sys.executable, "-m", "benchmarks.cv_scale", "--child", method, "--kind", kind, "--n", str(n),
               "--probes", str(probes), "--matvecs", str(matvecs)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--name", default="cv_scale", help="result file name (before the machine tag)")
    parser.add_argument("--rows", help="comma list of kind:N, e.g. full:2000,traced:1024 (default: the full set)")
    parser.add_argument("--probes", type=int, default=20)
    parser.add_argument("--matvecs", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--matrix-free-only", action="store_true", help="skip the exact (dense eigvalsh) runs")
    parser.add_argument("--output", help="result JSON (default benchmarks/results/<name>-<machine>.json)")
    parser.add_argument("--child", choices=["exact", "matrix_free"])
    parser.add_argument("--kind", choices=["full", "traced"])
    parser.add_argument("--n", type=int)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return

    from benchmarks.machine import write_result

    rows = []
    header = ("| kernel | N | dim | exact S | exact s | matrix-free S ± se | matrix-free s | rel. err S | "
              "speed-up | exact RSS GB | m-f RSS GB | faster |")
    print(header + "\n|" + "---|" * 12, flush=True)
    selected = ROWS_QUICK if args.quick else ROWS_FULL
    if args.rows:
        selected = [(kind, int(n)) for kind, n in (item.split(":") for item in args.rows.split(","))]
    name = args.name + ("-quick" if args.quick else "")
    for kind, n in selected:
        exact = ({"error": "not run (--matrix-free-only)"} if args.matrix_free_only
                 else _in_subprocess("exact", kind, n, args.probes, args.matvecs, args.timeout))
        free = _in_subprocess("matrix_free", kind, n, args.probes, args.matvecs, args.timeout)
        row = {"kernel": kind, "n": n, "dim": n * (10 if kind == "full" else 1), "exact": exact, "matrix_free": free}
        if "error" not in exact and "error" not in free:
            row["relative_error_entropy"] = abs(free["entropy"] - exact["entropy"]) / exact["entropy"]
            row["relative_error_trace"] = abs(free["trace"] - exact["trace"]) / exact["trace"]
            row["speedup"] = exact["seconds"] / free["seconds"]
            row["faster"] = "matrix-free" if free["seconds"] < exact["seconds"] else "exact"
        rows.append(row)
        fmt = lambda r, key, f: f(r[key]) if key in r else r.get("error", "–")  # noqa: E731
        print(f"| {kind} | {n} | {row['dim']} | {fmt(exact, 'entropy', '{:.4f}'.format)} | "
              f"{fmt(exact, 'seconds', '{:.1f}'.format)} | "
              f"{fmt(free, 'entropy', '{:.4f}'.format)} ± {free.get('entropy_stderr', float('nan')):.4f} | "
              f"{fmt(free, 'seconds', '{:.1f}'.format)} | {row.get('relative_error_entropy', float('nan')):.2%} | "
              f"{row.get('speedup', float('nan')):.1f}× | {exact.get('peak_rss_bytes', 0) / 1e9:.2f} | "
              f"{free.get('peak_rss_bytes', 0) / 1e9:.2f} | {row.get('faster', '–')} |", flush=True)
        path = write_result(name, {"probes": args.probes, "lanczos_steps": args.matvecs, "rows": rows}, args.output)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
