"""The training monitor: call it from any training loop; it computes NTK collective variables on a
schedule and writes them, with the loop's own scalars, to its sinks.

Example::

    monitor = ntkcv.NTKMonitor(model, probes=x_probe, labels=y_probe,
                               schedule=ntkcv.Schedule(every_steps=50),
                               sinks=[TensorBoardSink("runs/mlp")])
    for step in range(num_steps):
        params, opt_state, loss = train_step(params, opt_state, batch)
        monitor(step, params, loss=loss)
    monitor.close()
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import functools
import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ntkcv._program_store import argument_signature, program_key, stored_program
from ntkcv.cv import AVAILABLE, collective_variables, spectrum, weight_spectra
from ntkcv.cv.estimators import entropy_slq, trace_hutchpp
from ntkcv.models import Model
from ntkcv.ntk import matvec_flops, ntk_fn, ntk_operator
from ntkcv.ntk.compilation import quick_compile_options
from ntkcv.ntk.layout import output_layout
from ntkcv.schedule import Schedule
from ntkcv.sinks.base import call_all

logger = logging.getLogger("ntkcv.monitor")


#: Effective FLOPs per n³ of ``eigvalsh`` on an n × n kernel, calibrated on the cv_scale benchmark.
EIGH_FLOPS_PER_N3 = 10.0


@functools.cache
def _blas_libraries() -> Any:
    """The BLAS/LAPACK libraries loaded in this process (a ``threadpoolctl.ThreadpoolController``), among them
    the LAPACK that XLA's CPU eigendecompositions call: jaxlib takes it from SciPy, which is loaded first."""
    import scipy.linalg  # noqa: F401
    import threadpoolctl

    return threadpoolctl.ThreadpoolController()


def prefer_matrix_free(apply_fn: Callable, params: Any, x: jax.Array, *, trace_axes: Sequence[int],
                       num_probes: int, num_matvecs: int) -> bool:
    """Whether the matrix-free estimators are cheaper than the exact eigendecomposition for these shapes."""
    kept = output_layout(apply_fn, params, x, trace_axes).kept_size
    exact = EIGH_FLOPS_PER_N3 * float(x.shape[0] * kept) ** 3
    estimated = num_probes * num_matvecs * matvec_flops(apply_fn, params, x, trace_axes=trace_axes)
    logger.debug("exact %.3g vs matrix-free %.3g FLOPs", exact, estimated)
    return estimated < exact


def _write_step(sink: Any, step: int, values: dict[str, float], arrays: dict[str, np.ndarray]) -> None:
    """Writes one step's scalars and arrays to ``sink``."""
    if values:
        sink.write_scalars(step, values)
    if arrays:
        sink.write_arrays(step, arrays)


class _HookState(NamedTuple):
    step: jax.Array  # updates seen by the optax transform

BATCH = "batch"  # probes=BATCH: use the minibatch passed to each call


class NTKMonitor:
    """Computes NTK collective variables during training and streams them to sinks.

    Args:
      model: a :class:`ntkcv.Model` (from ``from_linen``/``from_nnx``/``from_function``) or a plain
        ``apply_fn(params, x)``.
      probes: probe inputs ``(N, …)``, fixed over training, or ``"batch"`` to use the ``batch`` passed
        to each call.
      labels: probe labels (integer ``(N,)`` or targets ``(N, C)``) for the alignment and class-wise CVs.
      schedule: when to compute (default every 100 steps).
      cvs: names from :data:`ntkcv.cv.AVAILABLE` (exact), or ``"entropy"``/``"trace"`` when
        ``matrix_free`` is set; one name alone may be given as a string; ``()`` computes no NTK (the monitor
        then only records scalars).
      matrix_free: estimate entropy and trace from the matrix-free operator (stochastic Lanczos
        quadrature and Hutch++) instead of building Θ; values come with standard errors
        (``cv/<name>_stderr``). ``"auto"`` decides per probe shape by estimated cost: exact costs
        ``EIGH_FLOPS_PER_N3 · n³`` for the eigendecomposition of the ``n × n`` kernel (its build is
        cheap with the structured path), matrix-free ``num_probes · num_matvecs`` operator products
        (:func:`ntkcv.ntk.matvec_flops`); the smaller wins (only when ``cvs`` ⊆ {entropy, trace}).
      num_probes, num_matvecs, seed: budget and randomness of the matrix-free estimators.
      log_spectrum: also write the eigenvalue spectrum as an array (a histogram in TensorBoard).
      weight_metrics: also write the data-free weight-spectrum summary (``weights/<metric>``).
      trace_axes, implementation: passed to :func:`ntkcv.ntk_fn`.
      sinks: objects with ``write_scalars``, ``write_arrays``, ``flush`` and ``close``, kept in the list
        :attr:`sinks`; a sink appended to it later receives what is written from then on. A sink that raises
        does not keep the others from their data, nor :meth:`flush` and :meth:`close` from reaching every
        sink: the first error is raised after (:func:`ntkcv.sinks.base.call_all`).
      blas_threads: threads of the BLAS/LAPACK libraries (OpenBLAS, MKL, via ``threadpoolctl``) from
        construction to :meth:`close`; they run the CPU eigendecomposition. ``1`` (default): OpenBLAS's idle
        threads busy-wait after each call, on the cores the training loop and XLA need (on 2 cores the
        monitor's program took 7.8 ms instead of 6.3 ms, and the next training steps slowed); ``None``
        leaves the libraries' setting. The limit is process-wide; it does not touch accelerators.
      asynchronous: compute the CVs in a background thread, so the training loop never waits for a
        compilation or a kernel: a firing hands over (a device copy of) the parameters and returns at
        once; results reach the sinks, with their own step, at a later call, at :meth:`flush` or at
        :meth:`close`. At most ``max_pending`` firings wait; one more blocks until the oldest is done. With
        an :class:`ntkcv.Model` and fixed probes, the computation compiles in the background from the start.
        A firing that raised raises at the next call, :meth:`flush` or :meth:`close`, after the other results
        and this call's scalars were written.

    Calling ``monitor(step, params, batch=None, **scalars)`` writes ``scalars`` under ``train/…`` on
    every call and, when the schedule fires, the CVs under ``cv/…``; it returns what it wrote in this
    call as host floats (the CVs of this step unless ``asynchronous``; then those finished since the
    last call, see :attr:`latest` for the newest value of every name). The computation is jitted once
    per probe shape (:attr:`trace_count` counts the programs made; on CPU with the quicker-compiling options of
    :func:`ntkcv.ntk.compilation.quick_compile_options`); results are fetched with one ``jax.device_get`` per
    firing. While JAX's persistent compilation cache is on (``jax_compilation_cache_dir``; ``ntkcv train`` turns
    it on), the traced program is also stored beside it with :mod:`jax.export`, so a later run of the same model,
    shapes and settings neither traces nor compiles it. Non-finite CVs are logged as NaN with a warning; they
    never raise. After :meth:`close`, calls and :meth:`flush` raise ``ValueError``.
    """

    def __init__(
        self,
        model: Model | Callable,
        probes: Any = None,
        *,
        labels: Any = None,
        schedule: Schedule | None = None,
        cvs: str | Sequence[str] = ("entropy", "effective_entropy", "trace"),
        matrix_free: bool | str = False,
        num_probes: int = 30,
        num_matvecs: int = 30,
        seed: int = 0,
        log_spectrum: bool = True,
        weight_metrics: bool = False,
        trace_axes: Sequence[int] = (-1,),
        implementation: str = "auto",
        sinks: Sequence[Any] = (),
        blas_threads: int | None = 1,
        asynchronous: bool = False,
        max_pending: int = 2,
    ):
        self.apply_fn = model.apply_fn if isinstance(model, Model) else model
        if not callable(self.apply_fn):
            raise TypeError(f"model must be an ntkcv.Model or a callable apply_fn, got {type(model).__name__}")
        if probes is None:
            raise ValueError("probes must be an array of probe inputs (N, ...) or 'batch'")
        if isinstance(probes, str) and probes != BATCH:
            raise ValueError(f"probes must be an array or {BATCH!r}, got {probes!r}")
        self.probes = probes if isinstance(probes, str) else jnp.asarray(probes)
        self.labels = None if labels is None else jnp.asarray(labels)
        if self.labels is not None and not isinstance(probes, str) and self.labels.shape[0] != self.probes.shape[0]:
            raise ValueError(f"labels must have one row per probe: {self.probes.shape[0]} probes, "
                             f"labels of shape {self.labels.shape}")
        self.schedule = schedule or Schedule(every_steps=100)
        self.cvs = (cvs,) if isinstance(cvs, str) else tuple(cvs)
        unknown = [name for name in self.cvs if name not in AVAILABLE]
        if unknown:
            raise ValueError(f"cvs must be names of collective variables, any of {list(AVAILABLE)}; "
                             f"got the unknown {unknown}")
        if matrix_free not in (True, False, "auto"):
            raise ValueError(f"matrix_free must be True, False or 'auto', got {matrix_free!r}")
        estimable = set(self.cvs) <= {"entropy", "trace"}
        if matrix_free is True and not estimable:
            raise ValueError(f"matrix_free supports the cvs 'entropy' and 'trace', got {list(self.cvs)}")
        self.matrix_free, self.log_spectrum, self.weight_metrics = matrix_free, log_spectrum, weight_metrics
        self.sinks = list(sinks)
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, got {max_pending}")
        self.max_pending = max_pending
        if blas_threads is not None and blas_threads < 1:
            raise ValueError(f"blas_threads must be at least 1 or None, got {blas_threads!r}")
        self._worker = concurrent.futures.ThreadPoolExecutor(1, "ntkcv-monitor") if asynchronous else None
        self._closed = False
        self._pending: collections.deque = collections.deque()  # futures of (step, values, arrays), in order
        self.latest: dict[str, float] = {}  # the newest value written under each name
        self.trace_count = 0  # programs made for the CV computation (traced or loaded from the store)
        self._programs: dict[Any, Callable] = {}  # per signature of (params, probes)
        self._checked_shapes: set = set()
        # No in-graph warnings: _write warns about non-finite CVs on the host, and a program without host
        # callbacks can be stored by JAX's persistent compilation cache.
        kernel_fn = ntk_fn(self.apply_fn, trace_axes=trace_axes, implementation=implementation, warn=False)
        num_classes = None
        if self.labels is not None and jnp.issubdtype(self.labels.dtype, jnp.integer):
            num_classes = int(self.labels.max()) + 1

        def exact(params, x, labels):
            kernel = kernel_fn(params, x)
            eigenvalues = spectrum(kernel, warn=False) if log_spectrum else None  # shared with the CVs
            values = collective_variables(kernel, self.cvs, labels=labels, num_classes=num_classes,
                                          eigenvalues=eigenvalues, warn=False)
            return values, eigenvalues

        def estimated(params, x, labels):
            op = ntk_operator(self.apply_fn, params, x, trace_axes=trace_axes)
            key_entropy, key_trace = jax.random.split(jax.random.key(seed))
            values = {}
            if "entropy" in self.cvs:
                est = entropy_slq(op.matvec, key_entropy, n=op.dim, num_probes=num_probes,
                                  num_matvecs=min(num_matvecs, op.dim), dtype=op.dtype)
                values.update(entropy=est.value, entropy_stderr=est.stderr)
            if "trace" in self.cvs:
                est = trace_hutchpp(op.matvec, key_trace, n=op.dim, num_matvecs=min(num_probes, 3 * op.dim),
                                    dtype=op.dtype)
                values.update(trace=est.value, trace_stderr=est.stderr)
            return values, None

        def compute(params, x, labels):
            self.trace_count += 1
            use_estimators = matrix_free is True or (matrix_free == "auto" and estimable and prefer_matrix_free(
                self.apply_fn, params, x, trace_axes=trace_axes, num_probes=num_probes, num_matvecs=num_matvecs))
            return (estimated if use_estimators else exact)(params, x, labels)

        # jitted by _program with the quick options: a first run compiles it beside the training step, on the same
        # cores (asynchronous: on one thread, leaving the loop the others)
        self._compute, self._compile_options = compute, quick_compile_options(background=asynchronous)
        self._settings = {"cvs": self.cvs, "matrix_free": matrix_free, "num_probes": num_probes,
                          "num_matvecs": num_matvecs, "seed": seed, "log_spectrum": log_spectrum,
                          "trace_axes": tuple(trace_axes), "implementation": str(implementation),
                          "num_classes": num_classes}
        warm_up = (self._worker is not None and self.cvs and isinstance(model, Model)
                   and not isinstance(self.probes, str))
        x = self._probe_inputs(model.params, None) if warm_up else None  # checked before anything is set or started
        # set by the thread that makes the monitor (threadpoolctl lets one thread at a time set OpenBLAS's
        # process-wide limit); undone by close()
        self._blas_limit = (None if blas_threads is None
                            else _blas_libraries().limit(limits=blas_threads, user_api="blas"))
        if warm_up:  # compiled in the background before the first firing (not run: a firing's work for nothing)
            self._worker.submit(lambda: self._program(model.params, x).lower(model.params, x, self.labels).compile())

    def __call__(self, step: int, params: Any, *, batch: Any = None, **scalars: Any) -> dict[str, float]:
        """Record ``scalars`` (``train/<name>``) and, when the schedule fires, the CVs (``cv/<name>``)."""
        self._check_open()
        step = int(step)
        values = {f"train/{name}": value for name, value in scalars.items()}
        arrays = {}
        if self.cvs and self.schedule(step):
            x = self._probe_inputs(params, batch)
            if self._worker is None:
                cvs, arrays = self._measure(params, x)
                values.update(cvs)
            else:
                if len(self._pending) >= self.max_pending:
                    concurrent.futures.wait([self._pending[0]])
                params = jax.device_put(params, may_alias=False)  # survives a train step that donates them
                self._pending.append(self._worker.submit(lambda: (step, *self._measure(params, x))))
        # earlier firings first; this step's scalars are written even when one of them failed
        drained, current = call_all([functools.partial(self._drain, wait=False),
                                     functools.partial(self._write, step, jax.device_get(values), arrays)])
        return {**drained, **current}

    def _measure(self, params: Any, x: jax.Array) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The CVs (and spectrum, weight metrics) of ``params`` on ``x``, fetched to the host."""
        cvs, eigenvalues = self._program(params, x)(params, x, self.labels)
        values = {f"cv/{name}": value for name, value in cvs.items()}
        arrays = {} if eigenvalues is None else {"cv/spectrum": eigenvalues}
        if self.weight_metrics:
            values.update({f"weights/{k}": v for k, v in weight_spectra(jax.device_get(params)).summary.items()})
        return jax.device_get((values, arrays))

    def _program(self, params: Any, x: jax.Array) -> jax.stages.Wrapped:
        """The CV computation for these shapes: made once per signature; when JAX's persistent compilation cache
        is on, loaded from (or stored in) the program store beside it, so a rerun skips tracing."""
        args = (params, x, self.labels)
        signature = argument_signature(args)
        if signature not in self._programs:
            program, loaded = stored_program(self._compute, args, program_key(self.apply_fn, args, self._settings),
                                             compiler_options=self._compile_options)
            self.trace_count += loaded
            self._programs[signature] = program
        return self._programs[signature]

    def _drain(self, *, wait: bool) -> dict[str, float]:
        """Write the results of finished firings (all of them with ``wait``), oldest first; one that failed is raised
        after the others were written."""
        finished = []
        while self._pending and (wait or self._pending[0].done()):
            finished.append(self._pending.popleft())
        written = call_all([functools.partial(self._write_result, future) for future in finished])
        return {name: value for values in written for name, value in values.items()}

    def _write_result(self, future: concurrent.futures.Future) -> dict[str, float]:
        return self._write(*future.result())

    def _write(self, step: int, values: dict[str, Any], arrays: dict[str, Any]) -> dict[str, float]:
        values = {name: float(np.asarray(value)) for name, value in values.items()}
        bad = sorted(name for name, value in values.items() if name.startswith("cv/") and not np.isfinite(value))
        if bad:
            warnings.warn(f"step {step}: non-finite collective variables {bad} logged as NaN", RuntimeWarning,
                          stacklevel=4)  # the caller of a synchronous monitor (through __call__ and call_all)
            values.update({name: float("nan") for name in bad})
        self.latest.update(values)
        arrays = {name: np.asarray(a) for name, a in arrays.items()}
        call_all([functools.partial(_write_step, sink, step, values, arrays) for sink in self.sinks])
        return values

    def as_optax_transform(self):
        """The monitor as an optax transformation that passes updates through unchanged.

        ``optax.chain(monitor.as_optax_transform(), optax.adam(1e-3))`` records the CVs of the parameters
        each update receives (call ``optimizer.update(grads, state, params)``), counting steps in its
        state. The schedule is evaluated inside the jitted update (``every_steps``, ``on_steps`` and
        ``log_spaced``); only when it fires are the parameters handed to the host, through
        ``jax.experimental.io_callback``. An ``every_secs`` schedule needs the host clock on every step
        and is refused; so is ``probes="batch"``. Loss and other scalars still go through ``monitor(...)``.
        """
        import optax
        from jax.experimental import io_callback

        if self.schedule.every_secs is not None or isinstance(self.probes, str):
            raise ValueError("as_optax_transform needs a step-based schedule (every_steps, on_steps, log_spaced) "
                             "and fixed probes")
        every, steps = self.schedule.every_steps, jnp.asarray(sorted(self.schedule.steps), jnp.int32)

        def init(params):
            del params
            return _HookState(jnp.zeros([], jnp.int32))

        def record(step, params) -> None:
            self(int(step), params)

        def update(updates, state, params=None):
            if params is None:
                raise ValueError("the monitor transform needs the parameters: optimizer.update(grads, state, params)")
            fires = jnp.isin(state.step, steps) | (state.step % every == 0 if every else False)
            jax.lax.cond(fires, lambda: io_callback(record, None, state.step, params, ordered=True), lambda: None)
            return updates, _HookState(state.step + 1)

        return optax.GradientTransformation(init, update)

    def _probe_inputs(self, params: Any, batch: Any) -> jax.Array:
        """The probe inputs of this call, checked against the model once per shape."""
        if isinstance(self.probes, str):
            if batch is None:
                raise ValueError("probes='batch' needs the minibatch: call monitor(step, params, batch=x, ...)")
            x = jnp.asarray(batch)
        else:
            x = self.probes
        if (x.shape, x.dtype) not in self._checked_shapes:
            try:
                jax.eval_shape(self.apply_fn, params, x)
            except (TypeError, ValueError) as error:
                raise ValueError(f"probe inputs of shape {x.shape} and dtype {x.dtype} do not fit the model: "
                                 f"{str(error).splitlines()[0]}") from error
            self._checked_shapes.add((x.shape, x.dtype))
        return x

    def flush(self) -> None:
        """Wait for pending firings, write them, and flush every sink."""
        self._check_open()
        call_all([functools.partial(self._drain, wait=True), *(sink.flush for sink in self.sinks)])

    def close(self) -> None:
        """Write pending firings, stop the background thread, restore the BLAS limit and close the sinks, each also
        when an earlier one raised (the first error is raised after); closing again does nothing."""
        if self._closed:
            return
        self._closed = True
        closing = [functools.partial(self._drain, wait=True)]
        if self._worker is not None:
            closing.append(self._worker.shutdown)
        if self._blas_limit is not None:
            closing.append(self._blas_limit.restore_original_limits)
        call_all([*closing, *(sink.close for sink in self.sinks)])

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("the NTKMonitor is closed: make a new one to record more")

    def __enter__(self) -> NTKMonitor:
        return self

    def __exit__(self, exc_type, *exc_info) -> None:
        if exc_type is None:
            self.close()
        else:  # the error that ends the block is the one to report; closing still reaches everything
            with contextlib.suppress(Exception):
                self.close()

