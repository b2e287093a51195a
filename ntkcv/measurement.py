"""Measurements: what the monitor computes when it fires, as a pair of pure functions with explicit state.

:func:`make_measurement` builds, once from the settings (as optax builds a transformation), a
:class:`Measurement` of two pure functions:

- ``init(params, probe_sets) -> state``: what the measurement carries from one firing to the next, zero-filled:
  the drift reference kernel and the previous firing's kernel of each probe set, and the previous firing's step;
- ``apply(params, probe_sets, state, step) -> (scalars, arrays, state)``: the collective variables of every probe
  set at ``step``; ``jit``-able (the monitor jits it once per shape) with no host callbacks.

``probe_sets`` maps a set's name to ``{"inputs": x}`` or ``{"inputs": x, "labels": y}``. The name ``""`` is the single
unnamed set, whose results keep the plain names (``entropy``); a named set's are ``<set>/entropy``. The names are
relative: the monitor writes them under ``cv/``. What each name means:

- the CVs of :data:`ntkcv.cv.AVAILABLE` of each set's kernel Θ; the drift CVs (``relative_distance``,
  ``cosine_distance``, ``subspace_overlap``) against the reference kernel, by default the first firing's
  (Fort et al. 2020, arXiv 2010.15110);
- ``kernel_velocity``: :func:`ntkcv.cv.kernel_velocity` between this firing's and the previous firing's kernel,
  divided by the steps between them (0 at the first firing, which has no previous one);
- ``spectrum`` (an array): Θ's eigenvalues, descending;
- ``layer/<group>/<name>`` with parameter groups: the CVs of each group's kernel Θ_g (Θ = Σ_g Θ_g) and
  ``trace_share`` = tr Θ_g / tr Θ;
- ``cross/<a>/<b>/frobenius_norm`` and ``cross/<a>/<b>/target_alignment`` for a pair of sets ``cross=(a, b)``: of
  the traced cross kernel Θ(x_a, x_b), e.g. test × train (:func:`ntkcv.cv.cross_target_alignment`);
- a user measurement ``fn``: called with the :class:`Context` of each set; a mapping it returns gives its names
  (scalars, and arrays for values with dimensions), a single value the name ``fn.__name__``.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ntkcv.cv import AVAILABLE, collective_variables
from ntkcv.cv._kernel import as_matrix, symmetric_eigvalsh
from ntkcv.cv.alignment import cross_target_alignment
from ntkcv.cv.collect import CLASSWISE, REQUIREMENTS
from ntkcv.cv.drift import relative_distance_of
from ntkcv.cv.estimators import entropy_slq, trace_hutchpp
from ntkcv.ntk import matvec_flops, ntk_fn, ntk_operator
from ntkcv.ntk.layout import output_layout

logger = logging.getLogger("ntkcv.monitor")

ProbeSets = Mapping[str, Mapping[str, jax.Array]]
State = dict[str, Any]
UserMeasurement = Callable[["Context"], Any]

#: Drift CVs, measured against the reference kernel the state carries.
DRIFT = tuple(name for name, needs in REQUIREMENTS.items() if needs == "reference")
VELOCITY = "kernel_velocity"
#: Names accepted in ``cvs`` besides user functions.
NAMES = (*AVAILABLE, VELOCITY)
#: CVs the matrix-free estimators give.
ESTIMABLE = ("entropy", "trace")
#: Effective FLOPs per n³ of ``eigvalsh`` on an n × n kernel, calibrated on the cv_scale benchmark.
EIGH_FLOPS_PER_N3 = 10.0


class Context(NamedTuple):
    """What a user measurement receives for one probe set at one firing (arrays inside ``jit``).

    Attributes:
      kernel: Θ as an ``(n, n)`` matrix.
      eigenvalues: Θ's eigenvalues, descending.
      labels: the set's labels or targets, or None.
      outputs: the model's outputs on the set's inputs.
      params: the parameters.
      reference: the drift reference kernel when drift is measured (``cvs`` holds a drift CV), else None.
      previous: the previous firing's kernel when ``kernel_velocity`` is measured, else None.
      inputs: the set's inputs.
    """

    kernel: jax.Array
    eigenvalues: jax.Array
    labels: jax.Array | None
    outputs: jax.Array
    params: Any
    reference: jax.Array | None
    previous: jax.Array | None
    inputs: jax.Array


class Measurement(NamedTuple):
    """``init(params, probe_sets) -> state`` and ``apply(params, probe_sets, state, step) -> (scalars, arrays,
    state)``; see the module docstring. ``needs``: the probe sets it reads, by name, when it needs particular ones
    (``"batch"``: the training batch of the step, which :class:`ntkcv.NTKMonitor` passes when called with
    ``batch=(inputs, targets)``)."""

    init: Callable[[Any, ProbeSets], State]
    apply: Callable[[Any, ProbeSets, State, jax.Array], tuple[dict[str, jax.Array], dict[str, jax.Array], State]]
    needs: frozenset[str] = frozenset()


def prefer_matrix_free(apply_fn: Callable, params: Any, x: jax.Array, *, trace_axes: Sequence[int],
                       num_probes: int, num_matvecs: int) -> bool:
    """Whether the matrix-free estimators are cheaper than the exact eigendecomposition for these shapes."""
    kept = output_layout(apply_fn, params, x, trace_axes).kept_size
    exact = EIGH_FLOPS_PER_N3 * float(x.shape[0] * kept) ** 3
    estimated = num_probes * num_matvecs * matvec_flops(apply_fn, params, x, trace_axes=trace_axes)
    logger.debug("exact %.3g vs matrix-free %.3g FLOPs", exact, estimated)
    return estimated < exact


def split_cvs(cvs: Sequence[str | UserMeasurement]) -> tuple[tuple[str, ...], tuple[UserMeasurement, ...]]:
    """The built-in names and the user measurements of ``cvs``; unknown names are a ``ValueError``."""
    names = tuple(cv for cv in cvs if isinstance(cv, str))
    unknown = [name for name in names if name not in NAMES]
    if unknown:
        raise ValueError(f"cvs must be names of collective variables, any of {list(NAMES)}, or functions of a "
                         f"Context; got the unknown {unknown}")
    functions = tuple(cv for cv in cvs if not isinstance(cv, str))
    for function in functions:
        if not callable(function) or len(inspect.signature(function).parameters) != 1:
            raise TypeError(f"a user measurement in cvs must be a function of one Context, got {function!r}")
    return names, functions


def check_labels(cvs: Sequence[str], labelled: Mapping[str, str | None], *, cross: tuple[str, str] | None = None,
                 layer_cvs: Sequence[str] = ()) -> None:
    """Refuse, naming them, the CVs that need labels on a set without (``labelled[set]``: None, ``"integer"`` or
    ``"targets"``); class-wise CVs need integer labels."""
    for name, kind in labelled.items():
        where = f"probe set {name!r}" if name else "the probes"
        for cv in (*cvs, *layer_cvs):
            if REQUIREMENTS.get(cv) == "labels" and kind is None:
                raise ValueError(f"collective variable {cv!r} needs labels, and {where} has none: pass labels")
            if cv in CLASSWISE and kind == "targets":
                raise ValueError(f"collective variable {cv!r} needs integer class labels; {where} has real targets")
    if cross is not None:
        missing = [name for name in cross if name not in labelled]
        if missing or cross[0] == cross[1]:
            raise ValueError(f"cross must name two different probe sets of {list(labelled)}; got {cross}")


def make_measurement(
    apply_fn: Callable,
    *,
    cvs: Sequence[str | UserMeasurement] = ("entropy", "effective_entropy", "trace"),
    trace_axes: Sequence[int] = (-1,),
    implementation: str = "auto",
    log_spectrum: bool = True,
    num_classes: int | None = None,
    groups: Any = None,
    layer_cvs: Sequence[str] = ("trace_share", "entropy"),
    cross: tuple[str, str] | None = None,
    matrix_free: bool | str = False,
    num_probes: int = 30,
    num_matvecs: int = 30,
    seed: int = 0,
) -> Measurement:
    """The monitor's measurement (see the module docstring).

    Args:
      apply_fn: ``apply_fn(params, x)``.
      cvs: names from :data:`NAMES` and user measurements (functions of a :class:`Context`).
      trace_axes, implementation: as for :func:`ntkcv.ntk_fn`.
      log_spectrum: also return the eigenvalues as the array ``spectrum``.
      num_classes: classes of integer labels, for the class-wise CVs.
      groups: parameter groups for per-layer kernels (``"layers"`` or a mapping of names to path patterns, as
        :func:`ntkcv.ntk_fn`'s ``groups``); None: none.
      layer_cvs: the CVs of each group's kernel: ``trace_share`` and names from :data:`ntkcv.cv.AVAILABLE` that need
        no reference.
      cross: two probe-set names ``(a, b)`` whose cross kernel Θ(x_a, x_b) gets ``frobenius_norm`` and, with
        labels on both, ``target_alignment``.
      matrix_free: estimate entropy and trace from the matrix-free operator (stochastic Lanczos quadrature and
        Hutch++), with standard errors ``<name>_stderr``; ``"auto"``: when cheaper, per probe shape.
      num_probes, num_matvecs, seed: budget and randomness of the estimators.
    """
    names, functions = split_cvs(cvs)
    drift = tuple(name for name in names if name in DRIFT)
    velocity = VELOCITY in names
    builtin = tuple(name for name in names if name != VELOCITY)
    bad_layer = [name for name in layer_cvs if name != "trace_share" and (name not in AVAILABLE or name in DRIFT)]
    if bad_layer:
        raise ValueError(f"layer_cvs must be 'trace_share' or CVs of {list(AVAILABLE)} that need no reference; "
                         f"got {bad_layer}")
    if matrix_free not in (True, False, "auto"):
        raise ValueError(f"matrix_free must be True, False or 'auto', got {matrix_free!r}")
    estimable = set(names) <= set(ESTIMABLE) and not functions and groups is None and cross is None
    if matrix_free is True and not estimable:
        raise ValueError(f"matrix_free estimates only the cvs {list(ESTIMABLE)} (no drift, velocity, user "
                         f"measurements, layer groups or cross kernels); got cvs {list(cvs)}")
    if cross is not None and tuple(trace_axes) == ():
        raise ValueError("cross-set CVs need a traced kernel (trace_axes=(-1,)), got trace_axes=()")
    kernel_fn = ntk_fn(apply_fn, trace_axes=trace_axes, implementation=implementation, warn=False)
    group_fn = None if groups is None else ntk_fn(apply_fn, trace_axes=trace_axes, implementation=implementation,
                                                   warn=False, groups=groups)

    def init(params: Any, probe_sets: ProbeSets) -> State:
        def zeros(probe):  # Θ's matrix shape from the model's output shape alone (tracing the NTK costs far more)
            x = probe["inputs"]
            n = x.shape[0] * output_layout(apply_fn, params, x, trace_axes).kept_size
            return jnp.zeros((n, n), jax.eval_shape(apply_fn, params, x).dtype)

        return {"reference": {name: zeros(p) for name, p in probe_sets.items()} if drift else {},
                "previous": {name: zeros(p) for name, p in probe_sets.items()} if velocity else {},
                "has_reference": jnp.asarray(False), "has_previous": jnp.asarray(False),
                "previous_step": jnp.asarray(0, jnp.int32)}

    def exact(params, name, probe, state, step, scalars, arrays, new_state):
        x, labels = probe["inputs"], probe.get("labels")
        prefix = f"{name}/" if name else ""
        layer_kernels = None if group_fn is None else group_fn(params, x)
        kernel = kernel_fn(params, x) if layer_kernels is None else sum(layer_kernels.values())
        matrix = as_matrix(kernel, warn=False)
        eigenvalues = symmetric_eigvalsh(matrix) if log_spectrum or functions or builtin else None
        reference = None
        if drift:
            reference = jnp.where(state["has_reference"], state["reference"][name], matrix)
            new_state["reference"][name] = reference
        values = collective_variables(matrix, builtin, labels=labels, reference=reference, num_classes=num_classes,
                                      eigenvalues=eigenvalues, warn=False) if builtin else {}
        previous = None
        if velocity:
            previous = state["previous"][name]
            elapsed = jnp.maximum(step - state["previous_step"], 1).astype(matrix.dtype)
            values[VELOCITY] = jnp.where(state["has_previous"], relative_distance_of(previous, matrix) / elapsed, 0.0)
            new_state["previous"][name] = matrix
        scalars.update({prefix + key: value for key, value in values.items()})
        if log_spectrum:
            arrays[prefix + "spectrum"] = eigenvalues
        if layer_kernels is not None:
            scalars.update(_layer_values(layer_kernels, layer_cvs, jnp.trace(matrix), labels, num_classes, prefix))
        if functions:
            context = Context(matrix, eigenvalues, labels, apply_fn(params, x), params, reference, previous, x)
            for function in functions:
                _add_user_values(function, function(context), prefix, scalars, arrays)

    def estimated(params, name, probe, scalars):
        op = ntk_operator(apply_fn, params, probe["inputs"], trace_axes=trace_axes)
        key_entropy, key_trace = jax.random.split(jax.random.key(seed))
        prefix = f"{name}/" if name else ""
        if "entropy" in names:
            est = entropy_slq(op.matvec, key_entropy, n=op.dim, num_probes=num_probes,
                              num_matvecs=min(num_matvecs, op.dim), dtype=op.dtype)
            scalars.update({f"{prefix}entropy": est.value, f"{prefix}entropy_stderr": est.stderr})
        if "trace" in names:
            est = trace_hutchpp(op.matvec, key_trace, n=op.dim, num_matvecs=min(num_probes, 3 * op.dim),
                                dtype=op.dtype)
            scalars.update({f"{prefix}trace": est.value, f"{prefix}trace_stderr": est.stderr})

    def apply(params: Any, probe_sets: ProbeSets, state: State, step: jax.Array):
        scalars: dict[str, jax.Array] = {}
        arrays: dict[str, jax.Array] = {}
        new_state = {**state, "reference": dict(state["reference"]), "previous": dict(state["previous"]),
                     "has_reference": jnp.asarray(True), "has_previous": jnp.asarray(True),
                     "previous_step": jnp.asarray(step, jnp.int32)}
        for name, probe in probe_sets.items():
            use_estimators = matrix_free is True or (matrix_free == "auto" and estimable and prefer_matrix_free(
                apply_fn, params, probe["inputs"], trace_axes=trace_axes, num_probes=num_probes,
                num_matvecs=num_matvecs))
            if use_estimators:
                estimated(params, name, probe, scalars)
            else:
                exact(params, name, probe, state, step, scalars, arrays, new_state)
        if cross is not None:
            scalars.update(_cross_values(kernel_fn(params, probe_sets[cross[0]]["inputs"],
                                                   probe_sets[cross[1]]["inputs"]), probe_sets, cross))
        return scalars, arrays, new_state

    return Measurement(init, apply)


def combine(measurements: Mapping[str, Measurement]) -> Measurement:
    """Measurements side by side, each under its own name, as one :class:`Measurement` (as ``optax.chain`` makes one
    transformation of several).

    ``init(params, inputs)`` and ``apply(params, inputs, state, step)`` take ``inputs``, a mapping of each
    measurement's name to its probe sets, and a state that maps each name to that measurement's state; the results
    of measurement ``name`` are written as ``<name>/<result>``.

    Example::

        measurement = combine({"cv": make_measurement(apply_fn), "curvature": curvature_measurement(apply_fn)})
    """
    bad = [name for name in measurements if not name or "/" in name]
    if bad:
        raise ValueError(f"measurement names must be non-empty and without '/', got {bad}")

    def init(params: Any, inputs: Mapping[str, ProbeSets]) -> State:
        return {name: measurement.init(params, inputs[name]) for name, measurement in measurements.items()}

    def apply(params: Any, inputs: Mapping[str, ProbeSets], state: State, step: jax.Array):
        scalars, arrays, new_state = {}, {}, {}
        for name, measurement in measurements.items():
            own_scalars, own_arrays, new_state[name] = measurement.apply(params, inputs[name], state[name], step)
            scalars.update({f"{name}/{key}": value for key, value in own_scalars.items()})
            arrays.update({f"{name}/{key}": value for key, value in own_arrays.items()})
        return scalars, arrays, new_state

    return Measurement(init, apply, frozenset().union(*(m.needs for m in measurements.values())))


def with_reference(state: State, references: Mapping[str, jax.Array]) -> State:
    """``state`` whose drift reference is ``references`` (set name → kernel) instead of the first firing's kernel."""
    unknown = sorted(set(references) - set(state["reference"]))
    if unknown or not state["reference"]:
        raise ValueError(f"a reference kernel needs a drift CV in cvs and names probe sets of "
                         f"{sorted(state['reference'])}; got references for {sorted(references)}")
    reference = dict(state["reference"])
    for name, kernel in references.items():
        matrix = as_matrix(jnp.asarray(kernel, reference[name].dtype), "reference")
        if matrix.shape != reference[name].shape:
            raise ValueError(f"the reference kernel of {name or 'the probes'!r} must have the kernel's shape "
                             f"{reference[name].shape}; got {matrix.shape}")
        reference[name] = matrix
    return {**state, "reference": reference, "has_reference": jnp.asarray(True)}


def _layer_values(layer_kernels: Mapping[str, jax.Array], layer_cvs: Sequence[str], total_trace: jax.Array,
                  labels: jax.Array | None, num_classes: int | None, prefix: str) -> dict[str, jax.Array]:
    names = tuple(name for name in layer_cvs if name != "trace_share")
    values = {}
    for group, kernel in layer_kernels.items():
        matrix = as_matrix(kernel, warn=False)
        group_values = collective_variables(matrix, names, labels=labels, num_classes=num_classes,
                                            warn=False) if names else {}
        if "trace_share" in layer_cvs:
            group_values["trace_share"] = jnp.trace(matrix) / total_trace
        values.update({f"{prefix}layer/{group}/{name}": value for name, value in group_values.items()})
    return values


def _cross_values(kernel: jax.Array, probe_sets: ProbeSets, cross: tuple[str, str]) -> dict[str, jax.Array]:
    a, b = cross
    prefix = f"cross/{a}/{b}/"
    values = {prefix + "frobenius_norm": jnp.linalg.norm(kernel)}
    labels_a, labels_b = probe_sets[a].get("labels"), probe_sets[b].get("labels")
    if labels_a is not None and labels_b is not None:
        values[prefix + "target_alignment"] = cross_target_alignment(kernel, labels_a, labels_b)
    return values


def _add_user_values(function: UserMeasurement, result: Any, prefix: str, scalars: dict, arrays: dict) -> None:
    items = result.items() if isinstance(result, Mapping) else [(function.__name__, result)]
    for key, value in items:
        value = jnp.asarray(value)
        (scalars if value.ndim == 0 else arrays)[prefix + key] = value
