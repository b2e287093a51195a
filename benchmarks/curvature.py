"""Cost and accuracy of sharpness measurements (``ntkcv.curvature``) on the digits models.

(a) One sharpness measurement against one training step (jitted ``value_and_grad`` of the mean cross-entropy and an
    ``optax.sgd`` update), on a batch of 8×8 digits: the default MLP (``make_model("mlp", num_outputs=10,
    widths=(128, 128))``) and the CNN of ``configs/cnn_digits.yaml`` (channels 8, 16; dense 64; relu), batches of 64
    and 256. Measurements: the Gauss–Newton top eigenvalue exact (Θ_full and ``eigvalsh``) and matrix-free (Lanczos,
    30 products), and the Hessian top eigenvalue (Lanczos, 30 Hessian-vector products). Times are medians of the
    jitted calls after compilation; "auto" is what ``matrix_free="auto"`` picks for the shape.
(b) The matrix-free Gauss–Newton top eigenvalue (float32, 30 Lanczos steps) of the default MLP on all 1797 digits
    (n·K = 17,970) against a reference: ``eigvalsh`` of the 17,970² matrix would take about 10·(nK)³ ≈ 6·10¹³ FLOPs
    (tens of minutes on two cores) and 1.3 GB, so the reference is a long float64 Lanczos run (200 steps) whose Ritz
    residual bounds its own error.

    python -m benchmarks.curvature            # a few minutes
    python -m benchmarks.curvature --quick    # under a minute: batch 64 only, (b) on 300 digits

BLAS/LAPACK (the exact path's ``eigvalsh``) runs on ``--blas-threads`` threads, 1 by default as in the monitor's
firings: on this shared two-core machine idle OpenBLAS threads otherwise busy-wait on cores that other work needs.
The 1-minute load average before and after is recorded: timings taken beside other jobs are not comparable.

Prints markdown tables and writes ``benchmarks/results/curvature-<machine>.json`` (``curvature-quick-…`` with
``--quick``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

import numpy as np

MODELS = {"mlp": {"widths": (128, 128)}, "cnn": {"channels": (8, 16), "widths": (64,), "activation": "relu"}}
LEARNING_RATE = 0.05
NUM_MATVECS = 30
REFERENCE_STEPS = 200


def _digits():
    from ntkcv.data import load_dataset

    data = load_dataset("digits")
    return np.concatenate([data.x_train, data.x_test]), np.concatenate([data.y_train, data.y_test])


def _model(kind: str, x):
    import jax

    from ntkcv.zoo import make_model

    module = make_model(kind, num_outputs=10, **MODELS[kind])
    params = module.init(jax.random.key(0), x[:1])["params"]
    return (lambda p, inputs: module.apply({"params": p}, inputs)), params


def _timed(fn, args, repeats: int) -> tuple[float, float, object]:
    """Compile seconds, median run seconds and the result of the jitted ``fn(*args)``."""
    import jax

    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_seconds = time.perf_counter() - start
    result = jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return compile_seconds, statistics.median(times), result


def cost_row(kind: str, batch: int, x_all, y_all, repeats: int) -> dict:
    import jax
    import optax

    from ntkcv import curvature

    x, y = x_all[:batch], y_all[:batch]
    apply_fn, params = _model(kind, x)
    optimizer = optax.sgd(LEARNING_RATE)

    def train_step(p, opt_state, x, y):
        loss, grads = jax.value_and_grad(lambda q: curvature.cross_entropy(apply_fn(q, x), y))(p)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    key = jax.random.key(0)
    measurements = {
        "ggn_exact": lambda p, x, y: curvature.ggn_top_eigenvalues(apply_fn, p, x, loss="cross_entropy", key=key,
                                                                   matrix_free=False),
        "ggn_matrix_free": lambda p, x, y: curvature.ggn_top_eigenvalues(
            apply_fn, p, x, loss="cross_entropy", key=key, matrix_free=True, num_matvecs=NUM_MATVECS),
        "hessian": lambda p, x, y: curvature.hessian_top_eigenvalues(
            curvature.make_loss_fn(apply_fn, x, y, loss="cross_entropy"), p, key, num_matvecs=NUM_MATVECS),
    }
    compile_seconds, step_seconds, _ = _timed(train_step, (params, optimizer.init(params), x, y), 10 * repeats)
    row = {"model": kind, "batch": batch, "num_params": sum(a.size for a in jax.tree_util.tree_leaves(params)),
           "train_step": {"seconds": step_seconds, "compile_seconds": compile_seconds},
           "auto_picks": "matrix-free" if curvature.prefer_matrix_free_ggn(
               apply_fn, params, x, estimate="top_eigenvalues", num_matvecs=NUM_MATVECS) else "exact"}
    for name, fn in measurements.items():
        compile_seconds, seconds, estimate = _timed(fn, (params, x, y), repeats)
        row[name] = {"seconds": seconds, "compile_seconds": compile_seconds, "relative_to_step": seconds / step_seconds,
                     "value": float(estimate.value[0]), "bound": float(estimate.stderr[0])}
    return row


def accuracy_row(n: int, x_all, loss: str) -> dict:
    import jax
    import jax.numpy as jnp

    from ntkcv import curvature

    x = jnp.asarray(x_all[:n])
    apply_fn, params = _model("mlp", x)
    estimate_fn = lambda p, x, steps, chunk: curvature.ggn_top_eigenvalues(  # noqa: E731
        apply_fn, p, x, loss=loss, key=jax.random.key(1), matrix_free=True, num_matvecs=steps, chunk_size=chunk)
    compile_seconds, seconds, estimate = _timed(lambda p, x: estimate_fn(p, x, NUM_MATVECS, 512),
                                                (params, x), 1)
    with jax.enable_x64(True):
        params64, x64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), (params, x))
        start = time.perf_counter()
        reference = jax.block_until_ready(jax.jit(lambda p, x: estimate_fn(p, x, REFERENCE_STEPS, 512))(
            params64, x64))
        reference_seconds = time.perf_counter() - start
        value, bound = float(reference.value[0]), float(reference.stderr[0])
    return {"loss": loss, "n": n, "dim": n * 10, "matrix_free": {"value": float(estimate.value[0]),
            "bound": float(estimate.stderr[0]), "seconds": seconds, "compile_seconds": compile_seconds,
            "num_matvecs": NUM_MATVECS},
            "reference": {"value": value, "bound": bound, "seconds": reference_seconds, "num_matvecs": REFERENCE_STEPS,
                          "dtype": "float64"},
            "relative_error": abs(float(estimate.value[0]) - value) / value}


def _cell(row: dict, name: str) -> str:
    return f"{1e3 * row[name]['seconds']:.2f} ({row[name]['relative_to_step']:.1f}×)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of each measurement (train step: 10×)")
    parser.add_argument("--blas-threads", type=int, default=1, help="BLAS/LAPACK threads (0: the library's setting)")
    args = parser.parse_args()

    import threadpoolctl

    from benchmarks.machine import write_result

    repeats = min(args.repeats, 2) if args.quick else args.repeats
    load_before = os.getloadavg()[0]
    limit = threadpoolctl.threadpool_limits(args.blas_threads) if args.blas_threads else contextlib.nullcontext()
    with limit:
        costs, accuracy = run(quick=args.quick, repeats=repeats)
    path = write_result("curvature-quick" if args.quick else "curvature",
                        {"num_matvecs": NUM_MATVECS, "learning_rate": LEARNING_RATE, "repeats": repeats,
                         "blas_threads": args.blas_threads or None,
                         "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
                         "cost": costs, "accuracy": accuracy})
    print(f"\nwrote {path}")


def run(*, quick: bool, repeats: int) -> tuple[list[dict], list[dict]]:
    """Print and return the rows of (a) and (b)."""
    x_all, y_all = _digits()
    batches = (64,) if quick else (64, 256)
    print("| model | batch | P | train step ms | GGN exact ms (× step) | GGN matrix-free ms (× step) | "
          "Hessian ms (× step) | λ GGN exact | λ GGN m-f ± bound | λ Hessian ± bound | auto |")
    print("|" + "---|" * 11, flush=True)
    costs = []
    for kind in MODELS:
        for batch in batches:
            row = cost_row(kind, batch, x_all, y_all, repeats)
            costs.append(row)
            print(f"| {kind} | {batch} | {row['num_params']} | {1e3 * row['train_step']['seconds']:.3f} | "
                  f"{_cell(row, 'ggn_exact')} | {_cell(row, 'ggn_matrix_free')} | {_cell(row, 'hessian')} | "
                  f"{row['ggn_exact']['value']:.4f} | {row['ggn_matrix_free']['value']:.4f} ± "
                  f"{row['ggn_matrix_free']['bound']:.1e} | {row['hessian']['value']:.4f} ± "
                  f"{row['hessian']['bound']:.1e} | {row['auto_picks']} |", flush=True)

    n = 300 if quick else len(x_all)
    print("\n| loss | n·K | matrix-free λ ± bound (30 steps, f32) | s | reference λ ± bound (200 steps, f64) | s | "
          "rel. error |")
    print("|" + "---|" * 7, flush=True)
    accuracy = []
    for loss in ("mse", "cross_entropy"):
        row = accuracy_row(n, x_all, loss)
        accuracy.append(row)
        free, ref = row["matrix_free"], row["reference"]
        print(f"| {loss} | {row['dim']} | {free['value']:.6f} ± {free['bound']:.1e} | {free['seconds']:.2f} | "
              f"{ref['value']:.8f} ± {ref['bound']:.1e} | {ref['seconds']:.1f} | {row['relative_error']:.1e} |",
              flush=True)
    return costs, accuracy


if __name__ == "__main__":
    main()
