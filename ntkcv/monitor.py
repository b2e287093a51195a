"""The training monitor: call it from any training loop; it measures the NTK on a schedule and writes the
collective variables, with the loop's own scalars, to its sinks.

It wires three parts, each usable alone: a :class:`~ntkcv.Schedule` (when to fire), a measurement
(:func:`ntkcv.measurement.make_measurement`: what a firing computes, one pure jitted function with explicit state)
and a :class:`~ntkcv.recorder.Recorder` (runs firings now or in the background and writes to the sinks).

Example::

    monitor = ntkcv.NTKMonitor(model, probes={"train": x_train[:256], "test": x_test[:256]},
                               labels={"train": y_train[:256], "test": y_test[:256]},
                               cvs=("entropy", "trace", "relative_distance", "kernel_velocity"),
                               schedule=ntkcv.Schedule(every_steps=50), sinks=[TensorBoardSink("runs/mlp")])
    for step in range(num_steps):
        params, opt_state, loss = train_step(params, opt_state, batch)
        monitor(step, params, loss=loss)
    monitor.close()
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ntkcv._program_store import argument_signature, program_key, stored_program
from ntkcv.cv import weight_spectra
from ntkcv.measurement import (
    DRIFT,
    VELOCITY,
    Measurement,
    ProbeSets,
    State,
    UserMeasurement,
    check_labels,
    combine,
    make_measurement,
    prefer_matrix_free,
    split_cvs,
    with_reference,
)
from ntkcv.models import Model
from ntkcv.ntk.compilation import ntk_compile_options, quick_compile_options
from ntkcv.ntk.devices import num_devices, replicated
from ntkcv.recorder import Recorder
from ntkcv.schedule import Schedule

__all__ = ["BATCH", "NTKMonitor", "prefer_matrix_free"]

class _HookState(NamedTuple):
    step: jax.Array  # updates seen by the optax transform

BATCH = "batch"  # probes=BATCH: use the minibatch passed to each call


class NTKMonitor:
    """Computes NTK collective variables during training and streams them to sinks.

    Args:
      model: a :class:`ntkcv.Model` (from ``from_linen``/``from_nnx``/``from_function``) or a plain
        ``apply_fn(params, x)``.
      probes: probe inputs ``(N, …)``, fixed over training; a mapping of named probe sets (``{"train": x_tr,
        "test": x_te}``), whose CVs are written as ``cv/<set>/<name>``; or ``"batch"`` to use the ``batch`` passed
        to each call.
      labels: probe labels (integer ``(N,)`` or targets ``(N, C)``) for the alignment and class-wise CVs; with
        named probe sets, a mapping with the labels of some or all sets.
      schedule: when to compute (default every 100 steps).
      cvs: names from :data:`ntkcv.measurement.NAMES` (one name alone may be a string): the CVs of
        :data:`ntkcv.cv.AVAILABLE`, the drift CVs against the first firing's kernel (or ``reference``) and
        ``kernel_velocity``; and your own measurements, functions of a :class:`ntkcv.measurement.Context` (see
        :mod:`ntkcv.measurement`). ``()`` computes no NTK (the monitor then only records scalars). CVs that need
        labels on a set without them are refused here, not at the first firing.
      reference: the drift reference kernel instead of the first firing's: an array, or a mapping per probe set.
      groups: per-layer kernels Θ = Σ_g Θ_g: ``"layers"`` (one group per layer) or a mapping of group names to
        parameter path patterns (see :func:`ntkcv.ntk_fn`); their ``layer_cvs`` are written as
        ``cv/layer/<group>/<name>``.
      layer_cvs: ``trace_share`` (tr Θ_g / tr Θ) and CVs of :data:`ntkcv.cv.AVAILABLE` of each group's kernel.
      cross: two probe-set names ``(a, b)``: the Frobenius norm and target alignment of the cross kernel
        Θ(x_a, x_b), as ``cv/cross/<a>/<b>/<name>``.
      matrix_free: estimate entropy and trace from the matrix-free operator (stochastic Lanczos
        quadrature and Hutch++) instead of building Θ; values come with standard errors
        (``cv/<name>_stderr``). ``"auto"`` decides per probe shape by estimated cost (only when ``cvs`` ⊆
        {entropy, trace}; see :func:`ntkcv.measurement.prefer_matrix_free`).
      num_probes, num_matvecs, seed: budget and randomness of the matrix-free estimators.
      log_spectrum: also write the eigenvalue spectrum as an array (``cv/spectrum``).
      weight_metrics: also write the data-free weight-spectrum summary (``weights/<metric>``, see
        :func:`ntkcv.cv.weight_spectra`); ``"layers"``: also each layer's metrics (``weights/<layer>/<metric>``).
      trace_axes, implementation: passed to :func:`ntkcv.ntk_fn`.
      measurements: more measurements by name (:class:`ntkcv.measurement.Measurement`, e.g.
        :func:`ntkcv.curvature.curvature_measurement`), written as ``<name>/<result>`` and run in the same program as
        the CVs. Each receives the named probe sets (the single unnamed one as ``""``) and, when the call passes
        ``batch=(inputs, targets)``, the training batch as the set ``"batch"``.
      sinks, blas_threads, asynchronous, max_pending: the :class:`~ntkcv.recorder.Recorder`'s. ``sinks`` is kept
        in the list :attr:`sinks` (a sink appended later receives what is written from then on); ``blas_threads``
        limits the BLAS/LAPACK threads while a firing runs, and leaves them as they were otherwise;
        ``asynchronous`` computes in a background thread, so that a firing hands over (a device copy of) the
        parameters and returns at once; results reach the sinks, with their own step, at a later call, at
        :meth:`flush` or at :meth:`close`. With an :class:`ntkcv.Model` and fixed probes, the computation then
        compiles in the background from the start.

    Calling ``monitor(step, params, batch=None, **scalars)`` writes ``scalars`` under ``train/…`` on every call and,
    when the schedule fires, the measurements under ``cv/…``; it returns what it wrote in this call as host floats
    (the CVs of this step unless ``asynchronous``; then those finished since the last call, see :attr:`latest` for
    the newest value of every name). The measurement is jitted once per probe shape (:attr:`trace_count` counts the
    programs made; on CPU with the quicker-compiling options of :func:`ntkcv.ntk.compilation.quick_compile_options`
    and the faster-running ones of :func:`ntkcv.ntk.compilation.ntk_compile_options`).
    While JAX's persistent compilation cache is on (``jax_compilation_cache_dir``; ``ntkcv train`` turns it on), the
    traced program is also stored beside it with :mod:`jax.export`, so a later run of the same model, shapes and
    settings neither traces nor compiles it (not with user measurements, whose code the store cannot key).
    Non-finite CVs are logged as NaN with a warning; they never raise. After :meth:`close`, calls raise
    ``ValueError``. :attr:`state` is what the measurement carries across firings (the drift reference and the
    previous kernel): save it with a checkpoint (after :meth:`flush`) and set it again on resuming, and a resumed run
    logs the same drift and velocity as an uninterrupted one.

    Under ``jax.distributed`` with several processes, every process makes the monitor and calls it at every step with
    the same parameters and probes: a firing is one program over all processes' devices (the NTK's rows split among
    them), whose CVs every process gets back, the same on each. Only process 0 writes to its sinks (create them there
    only: ``sinks=[...] if jax.process_index() == 0 else []``, as a sink opens its file when made); the program is not
    stored.
    """

    def __init__(
        self,
        model: Model | Callable,
        probes: Any = None,
        *,
        labels: Any = None,
        schedule: Schedule | None = None,
        cvs: str | Sequence[str | UserMeasurement] = ("entropy", "effective_entropy", "trace"),
        reference: Any = None,
        groups: Any = None,
        layer_cvs: Sequence[str] = ("trace_share", "entropy"),
        cross: tuple[str, str] | None = None,
        matrix_free: bool | str = False,
        num_probes: int = 30,
        num_matvecs: int = 30,
        seed: int = 0,
        log_spectrum: bool = True,
        weight_metrics: bool | str = False,
        trace_axes: Sequence[int] = (-1,),
        implementation: str = "auto",
        sinks: Sequence[Any] = (),
        blas_threads: int | None = 1,
        asynchronous: bool = False,
        max_pending: int = 2,
        measurements: Mapping[str, Measurement] | None = None,
    ):
        self.apply_fn = model.apply_fn if isinstance(model, Model) else model
        if not callable(self.apply_fn):
            raise TypeError(f"model must be an ntkcv.Model or a callable apply_fn, got {type(model).__name__}")
        self.probes, self.labels = _probe_sets(probes, labels)
        self.schedule = schedule or Schedule(every_steps=100)
        self.cvs = (cvs,) if isinstance(cvs, str) else tuple(cvs)
        names, functions = split_cvs(self.cvs)
        labelled = {name: None if self.labels.get(name) is None else
                    ("integer" if jnp.issubdtype(self.labels[name].dtype, jnp.integer) else "targets")
                    for name in (self.probes if isinstance(self.probes, dict) else {"": None})}
        check_labels(names, labelled, cross=cross, layer_cvs=layer_cvs if groups is not None else ())
        integer = [labels for labels in self.labels.values() if jnp.issubdtype(labels.dtype, jnp.integer)]
        num_classes = max(int(labels.max()) for labels in integer) + 1 if integer else None
        if weight_metrics not in (True, False, "layers"):
            raise ValueError(f"weight_metrics must be True, False or 'layers', got {weight_metrics!r}")
        self.weight_metrics = weight_metrics
        self.measurements = dict(measurements or {})
        if "cv" in self.measurements:
            raise ValueError("measurements may not be named 'cv': the collective variables are written there")
        if self.cvs:
            self.measurements = {"cv": make_measurement(
                self.apply_fn, cvs=self.cvs, trace_axes=trace_axes, implementation=implementation,
                log_spectrum=log_spectrum, num_classes=num_classes, groups=groups, layer_cvs=layer_cvs, cross=cross,
                matrix_free=matrix_free, num_probes=num_probes, num_matvecs=num_matvecs, seed=seed),
                **self.measurements}
        self._measurement = combine(self.measurements)
        fixed = set() if isinstance(self.probes, str) else set(self.probes)
        missing = sorted(self._measurement.needs - fixed - {"batch"})
        if missing:
            raise ValueError(f"measurements need the probe sets {missing}, which are not among the probes "
                             f"{sorted(fixed)}")
        self._recorder = Recorder(sinks, asynchronous=asynchronous, max_pending=max_pending,
                                  blas_threads=blas_threads)
        self.trace_count = 0  # programs made for the measurement (traced or loaded from the store)
        self._programs: dict[Any, Callable] = {}  # per signature of the program's arguments
        self._checked_shapes: set = set()
        self._state: State | None = None
        self._reference = reference
        self._tracks_state = bool(set(names) & {*DRIFT, VELOCITY})
        if reference is not None and not set(names) & set(DRIFT):
            raise ValueError("reference is the drift reference kernel: it needs a drift CV in cvs "
                             f"(any of {list(DRIFT)})")
        # jitted by _program with the quick options: a first run compiles it beside the training step, on the same
        # cores (asynchronous: on one thread, leaving the loop the others)
        self._compile_options = {**quick_compile_options(background=asynchronous), **ntk_compile_options()}
        self._settings = None if functions or set(self.measurements) - {"cv"} else {
            "cvs": names, "matrix_free": matrix_free, "num_probes": num_probes, "num_matvecs": num_matvecs,
            "seed": seed, "log_spectrum": log_spectrum, "trace_axes": tuple(trace_axes),
            "implementation": str(implementation), "num_classes": num_classes, "groups": repr(groups),
            "layer_cvs": tuple(layer_cvs), "cross": cross}
        if (self.measurements and isinstance(model, Model) and not isinstance(self.probes, str)
                and "batch" not in self._measurement.needs):
            probe_sets = self._inputs(model.params, None)  # checked before anything is started
            state = self._initial_state(model.params, probe_sets)
            # compiled in the background before the first firing (not run: a firing's work for nothing)
            self._recorder.prepare(lambda: self._program(model.params, probe_sets).lower(
                model.params, probe_sets, state, jnp.int32(0)).compile())

    @property
    def sinks(self) -> list[Any]:
        """The sinks written to; a sink appended to this list receives what is written from then on."""
        return self._recorder.sinks

    @sinks.setter
    def sinks(self, sinks: Sequence[Any]) -> None:
        self._recorder.sinks = list(sinks)

    @property
    def latest(self) -> dict[str, float]:
        """The newest value written under each name."""
        return self._recorder.latest

    @property
    def state(self) -> State | None:
        """What the measurement carries across firings (None before the first); :meth:`flush` first, so that it
        includes every firing so far. Set it to a saved state to continue from there."""
        return self._state

    @state.setter
    def state(self, state: State | None) -> None:
        self._state = state

    def initial_state(self, params: Any, *, batch: Any = None) -> State:
        """The state before the first firing (fixed probes only): the template a saved :attr:`state` restores into;
        ``batch``: a training batch ``(inputs, targets)`` of the loop's shape, for measurements that need one."""
        if isinstance(self.probes, str):
            raise ValueError("probes='batch' has no fixed shape, so no state before its first firing")
        return self._initial_state(params, self._inputs(params, batch))

    def __call__(self, step: int, params: Any, *, batch: Any = None, **scalars: Any) -> dict[str, float]:
        """Record ``scalars`` (``train/<name>``) and, when the schedule fires, the CVs (``cv/<name>``)."""
        step = int(step)
        values = {f"train/{name}": value for name, value in scalars.items()}
        arrays: dict[str, Any] = {}
        if self.measurements and self.schedule(step):
            probe_sets = self._inputs(params, batch)
            if self._recorder.asynchronous:
                params = jax.device_put(params, may_alias=False)  # survives a train step that donates them
            measured = self._recorder.fire(step, functools.partial(self._fire, step, params, probe_sets))
            if measured is not None:
                values.update(measured[0])
                arrays = measured[1]
        return self._recorder.record(step, values, arrays)

    def _fire(self, step: int, params: Any, probe_sets: dict[str, ProbeSets]) -> tuple[dict[str, Any], dict[str, Any]]:
        """One firing: the measurement of ``params`` (and the weight metrics), fetched to the host."""
        state = self._initial_state(params, probe_sets) if self._state is None else self._state
        inputs = replicated((params, probe_sets))  # on every device the NTK is computed on
        scalars, arrays, self._state = self._program(*inputs)(*inputs, state, jnp.int32(step))
        if self.weight_metrics:
            spectra = weight_spectra(jax.device_get(params))
            per_layer = spectra.per_layer_scalars() if self.weight_metrics == "layers" else {}
            scalars.update({f"weights/{k}": v for k, v in {**spectra.summary, **per_layer}.items()})
        return jax.device_get((scalars, arrays))

    def _initial_state(self, params: Any, inputs: dict[str, ProbeSets]) -> State:
        state = self._measurement.init(params, inputs)
        if self._reference is not None:
            references = self._reference if isinstance(self._reference, Mapping) else {"": self._reference}
            state = {**state, "cv": with_reference(state["cv"], references)}
        # committed to the device, as the program's outputs are, which later firings pass back: the program is
        # compiled once, not once more at the second firing
        return jax.device_put(state, jax.devices()[0]) if num_devices() == 1 else replicated(state)

    def _program(self, params: Any, probe_sets: dict[str, ProbeSets]) -> jax.stages.Wrapped:
        """The measurement for these shapes: made once per signature; when JAX's persistent compilation cache
        is on, loaded from (or stored in) the program store beside it, so a rerun skips tracing."""
        signature = argument_signature((params, probe_sets))
        if signature not in self._programs:
            first = next(iter(probe_sets["cv"].values()))["inputs"] if "cv" in probe_sets else None
            args = (params, probe_sets, jax.eval_shape(self._measurement.init, params, probe_sets), jnp.int32(0))

            def measure(*call_args):
                self.trace_count += 1
                return self._measurement.apply(*call_args)

            # not stored: user measurements (their code is not in the store's key), programs over several processes
            if self._settings is None or jax.process_count() > 1:
                program, loaded = jax.jit(measure, compiler_options=self._compile_options), False
            else:
                key = program_key(self.apply_fn, (params, first), args, self._settings)
                program, loaded = stored_program(measure, args, key, compiler_options=self._compile_options)
            self.trace_count += loaded
            self._programs[signature] = program
        return self._programs[signature]

    def as_optax_transform(self):
        """The monitor as an optax transformation that passes updates through unchanged.

        ``optax.chain(monitor.as_optax_transform(), optax.adam(1e-3))`` records the CVs of the parameters
        each update receives (call ``optimizer.update(grads, state, params)``), counting steps in its
        state. The schedule is evaluated inside the jitted update (``every_steps``, ``on_steps`` and
        ``log_spaced``); only when it fires are the parameters handed to the host, through
        ``jax.experimental.io_callback``, which hands them to the recorder and returns: no sink is written
        inside ``jit``. The firing runs in the background thread when ``asynchronous``, else at the next
        ``monitor(...)``, :meth:`flush` or :meth:`close`. An ``every_secs`` schedule needs the host clock on every
        step and is refused; so is ``probes="batch"``. Loss and other scalars still go through ``monitor(...)``.
        """
        import optax
        from jax.experimental import io_callback

        if self.schedule.every_secs is not None or isinstance(self.probes, str) or "batch" in self._measurement.needs:
            raise ValueError("as_optax_transform needs a step-based schedule (every_steps, on_steps, log_spaced), "
                             "fixed probes and measurements without the training batch")
        every, steps = self.schedule.every_steps, jnp.asarray(sorted(self.schedule.steps), jnp.int32)

        def init(params):
            del params
            return _HookState(jnp.zeros([], jnp.int32))

        def record(step, params) -> None:  # hands the parameters over: no computing or writing inside the callback
            step = int(step)
            self._recorder.hand_over(step, functools.partial(self._fire, step, params, self._inputs(params, None)))

        def update(updates, state, params=None):
            if params is None:
                raise ValueError("the monitor transform needs the parameters: optimizer.update(grads, state, params)")
            fires = jnp.isin(state.step, steps) | (state.step % every == 0 if every else False)
            jax.lax.cond(fires, lambda: io_callback(record, None, state.step, params, ordered=True), lambda: None)
            return updates, _HookState(state.step + 1)

        return optax.GradientTransformation(init, update)

    def _inputs(self, params: Any, batch: Any) -> dict[str, ProbeSets]:
        """Each measurement's probe sets in this call (see ``measurements``), each set checked against the model once
        per shape."""
        batch_set = None
        if batch is not None:
            inputs, targets = batch if isinstance(batch, tuple) else (batch, None)
            batch_set = {"inputs": jnp.asarray(inputs)} | ({} if targets is None else {"labels": jnp.asarray(targets)})
            if targets is not None and batch_set["labels"].shape[:1] != batch_set["inputs"].shape[:1]:
                raise ValueError(f"batch=(inputs, targets) needs one target per input: inputs of shape "
                                 f"{batch_set['inputs'].shape}, targets of shape {batch_set['labels'].shape}")
        if isinstance(self.probes, str):
            if batch_set is None:
                raise ValueError("probes='batch' needs the minibatch: call monitor(step, params, batch=x, ...)")
            probe_sets = {"": {"inputs": batch_set["inputs"]}}
        else:
            probe_sets = {name: {"inputs": x} | ({"labels": self.labels[name]} if name in self.labels else {})
                          for name, x in self.probes.items()}
        if "batch" in self._measurement.needs and (batch_set is None or "labels" not in batch_set):
            raise ValueError(f"the measurements {sorted(self.measurements)} need the training batch: call "
                             "monitor(step, params, batch=(inputs, targets), ...)")
        self._check_shapes(params, {**probe_sets, **({} if batch_set is None else {"batch": batch_set})})
        extra = probe_sets if batch_set is None else {**probe_sets, "batch": batch_set}
        return {name: probe_sets if name == "cv" else extra for name in self.measurements}

    def _check_shapes(self, params: Any, probe_sets: ProbeSets) -> None:
        for name, probe in probe_sets.items():
            x = probe["inputs"]
            if (name, x.shape, x.dtype) not in self._checked_shapes:
                try:
                    jax.eval_shape(self.apply_fn, params, x)
                except (TypeError, ValueError) as error:
                    where = f"probe set {name!r}" if name else "probe inputs"
                    raise ValueError(f"{where} of shape {x.shape} and dtype {x.dtype} do not fit the model: "
                                     f"{str(error).splitlines()[0]}") from error
                self._checked_shapes.add((name, x.shape, x.dtype))

    def flush(self) -> None:
        """Run and write pending firings, and flush every sink."""
        self._recorder.flush()

    def close(self) -> None:
        """Write pending firings, stop the background thread and close the sinks, each also when an earlier one
        raised (the first error is raised after); closing again does nothing."""
        self._recorder.close()

    def __enter__(self) -> NTKMonitor:
        return self

    def __exit__(self, exc_type, *exc_info) -> None:
        if exc_type is None:
            self.close()
        else:  # the error that ends the block is the one to report; closing still reaches everything
            with contextlib.suppress(Exception):
                self.close()


def _probe_sets(probes: Any, labels: Any) -> tuple[dict[str, jax.Array] | str, dict[str, jax.Array]]:
    """``probes`` as ``"batch"`` or a mapping of named sets (``""``: the one unnamed set) and ``labels`` as a mapping
    of some of those sets to their labels, checked."""
    if probes is None:
        raise ValueError("probes must be an array of probe inputs (N, ...), a mapping of named probe sets, or "
                         f"{BATCH!r}")
    if isinstance(probes, str):
        if probes != BATCH:
            raise ValueError(f"probes must be an array, a mapping or {BATCH!r}, got {probes!r}")
        if labels is not None:
            raise ValueError("labels cannot go with probes='batch' (the minibatch changes at every call)")
        return probes, {}
    named = isinstance(probes, Mapping)
    sets = {str(name): jnp.asarray(x) for name, x in probes.items()} if named else {"": jnp.asarray(probes)}
    if named and (not sets or any(not name or "/" in name for name in sets)):
        raise ValueError(f"probe sets need non-empty names without '/', got {list(sets)}")
    if labels is None:
        labels = {}
    elif not named:
        labels = {"": labels}
    elif not isinstance(labels, Mapping):
        raise ValueError("with named probe sets, labels must be a mapping of set names to labels")
    labels = {str(name): jnp.asarray(y) for name, y in labels.items()}
    for name, y in labels.items():
        if name not in sets:
            raise ValueError(f"labels for {name!r}, which is not a probe set of {list(sets)}")
        if y.shape[:1] != sets[name].shape[:1]:
            where = f"probe set {name!r}" if named else "the probes"
            raise ValueError(f"labels must have one row per probe: {sets[name].shape[0]} in {where}, labels of "
                             f"shape {y.shape}")
    return sets, labels
