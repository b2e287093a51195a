r"""Gradient-flow predictions of the linearised network from the empirical NTK at initialisation.

In the lazy regime a network trained by gradient descent on the MSE loss behaves as its linearisation
:math:`f^{\text{lin}}_t = f_0 + J_0(θ_t - θ_0)` (Lee et al. 2019, §2), whose outputs follow a linear ODE
driven by the NTK at initialisation and are solved here in closed form. With the loss of ``ntkcv train``
on ``n`` training points with ``K`` outputs, and gradient descent :math:`θ ← θ - η∇L` taken as a flow in
steps :math:`t`:

.. math::
   L(θ) = \frac{1}{2n} \sum_{i=1}^n \|f(x_i) - y_i\|^2, \qquad
   \frac{df_{\text{train}}}{dt} = -\frac{η}{n}\, Θ\, (f_{\text{train}} - y), \qquad
   \frac{df_{\text{test}}}{dt} = -\frac{η}{n}\, Θ_{\text{test,train}}\, (f_{\text{train}} - y)

This is the same dynamics as neural-tangents' ``predict.gradient_descent_mse``, in other units: its loss
is the mean over all ``n·K`` entries (ours divided by ``K``) and its output-traced kernel is the mean
over outputs (ours divided by ``K``), so its predictions with ``learning_rate=K·η`` on its own kernel are
ours with ``learning_rate=η``; its relative ``diag_reg`` is our ``ridge``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ntkcv.measurement import Measurement, ProbeSets, State
from ntkcv.ntk import ntk_fn
from ntkcv.ntk.layout import flatten_kernel

__all__ = ["PredictFn", "gradient_descent_mse", "kernel_regression", "linearisation_measurement"]

#: ``predict_fn(t, outputs_train_0, outputs_test_0=None, kernel_test_train=None) -> (f_train_t, f_test_t)``.
PredictFn = Callable[..., tuple[jax.Array, jax.Array | None]]


def gradient_descent_mse(
    kernel_train_train: jax.Array,
    targets: jax.Array,
    *,
    learning_rate: float = 1.0,
    ridge: float = 0.0,
) -> PredictFn:
    r"""Outputs of the linearised network after ``t`` steps of gradient descent on the MSE loss, in closed form.

    With :math:`A = \bar Θ + r\,\bar λ I = V \operatorname{diag}(λ) V^⊤` the (regularised) train kernel
    acting on the outputs, :math:`\bar λ = \operatorname{tr}\bar Θ / m` its mean eigenvalue, :math:`τ = ηt/n`
    and :math:`δ = f_{\text{train}}(0) - y`, the flow of the module docstring gives

    .. math::
       f_{\text{train}}(t) = f_{\text{train}}(0) - V \operatorname{diag}\big(1 - e^{-τλ}\big) V^⊤ δ, \qquad
       f_{\text{test}}(t) = f_{\text{test}}(0) - \bar Θ_{\text{test,train}}\, V
       \operatorname{diag}\Big(\frac{1 - e^{-τλ}}{λ}\Big) V^⊤ δ

    from one eigendecomposition, done here. Two kinds of kernel (those of :func:`ntkcv.ntk_fn`):

    - full, ``(n, n, K, K)`` (``trace_axes=()``): :math:`\bar Θ` is the flattened ``(n·K, n·K)`` kernel
      (:func:`ntkcv.flatten_kernel`, ``m = n·K``): the exact linearised dynamics of a finite network;
    - output-traced, ``(n, n)``: ntkcv's traced kernel *sums* the output blocks,
      :math:`Θ^{\text{tr}} = \sum_k Θ_{kk}`, and the dynamics use :math:`\bar Θ = Θ^{\text{tr}}/K ⊗ I_K`
      (``m = n``), the mean diagonal block for every output. Exact when the off-diagonal output blocks
      vanish and the diagonal ones are equal, as at infinite width; else an approximation. (neural-tangents'
      traced kernel is already the mean, :math:`Θ^{\text{tr}}/K`, and enters as it is.)

    Numerical conventions: eigenvalues below zero (round-off) count as zero, and
    :math:`(1 - e^{-τλ})/λ → τ` as :math:`λ → 0` (``expm1``, no division by zero), so finite ``t`` stays
    finite for singular kernels. At :math:`t = ∞` the factor is :math:`1/λ` on eigenvalues above
    :math:`m\,ε\,λ_{\max}` and 0 below (a pseudo-inverse: the components of δ in the kernel's numerical
    null space are never fitted), so an unregularised singular kernel gives the minimum-norm interpolant.
    With ``ridge > 0`` the regularised kernel drives the training outputs too (they still converge to
    ``y``); for the kernel-ridge fit on the training points pass ``kernel_test_train=kernel_train_train``.

    Args:
      kernel_train_train: :math:`Θ(x_{\text{train}}, x_{\text{train}})` at initialisation, full
        ``(n, n, K, K)`` or output-traced ``(n, n)``.
      targets: ``(n, K)`` real targets (one-hot for classification).
      learning_rate: the step size η of gradient descent (> 0); ``t`` counts steps of this size.
      ridge: ``r ≥ 0``, added to the diagonal relative to the mean eigenvalue of :math:`\bar Θ`
        (``ridge * trace / m``: scale-free, and neural-tangents' default ``diag_reg``).

    Returns:
      ``predict_fn(t, outputs_train_0, outputs_test_0=None, kernel_test_train=None)``, pure and ``jit``-able,
      returning ``(f_train_t, f_test_t)``: ``t`` a number of steps, ``None`` or ``jnp.inf`` for
      :math:`t → ∞`, or an array of them (each output then gains ``t``'s leading axes);
      ``outputs_train_0`` ``(n, K)`` the network's outputs at initialisation; for test predictions
      ``outputs_test_0`` ``(n_test, K)`` and ``kernel_test_train`` (``(n_test, n, K, K)`` or
      ``(n_test, n)``, the same kind as the train kernel), else ``f_test_t`` is ``None``. Everything is
      computed in the kernel's floating dtype.

    Example:
      >>> import jax.numpy as jnp, ntkcv.predict
      >>> kernel = jnp.array([[2.0, 1.0], [1.0, 2.0]])  # traced, K = 1
      >>> predict_fn = ntkcv.predict.gradient_descent_mse(kernel, jnp.array([[1.0], [-1.0]]), learning_rate=0.5)
      >>> f_train, _ = predict_fn(None, jnp.zeros((2, 1)))
      >>> f_train.ravel().round(4).tolist()  # interpolates the targets
      [1.0, -1.0]
      >>> f_train, f_test = predict_fn(jnp.array([0.0, 4.0]), jnp.zeros((2, 1)), jnp.zeros((1, 1)), kernel[:1])
      >>> f_train.shape, f_test.shape
      ((2, 2, 1), (2, 1, 1))

    References:
      Jacot, Gabriel & Hongler, "Neural tangent kernel: convergence and generalization in neural networks",
      NeurIPS 2018, arXiv 1806.07572; Lee et al., "Wide neural networks of any depth evolve as linear models
      under gradient descent", NeurIPS 2019, arXiv 1902.06720, §2.
    """
    kernel_train_train, targets = jnp.asarray(kernel_train_train), jnp.asarray(targets)
    num_train, num_outputs = _check_targets(targets)
    traced = _check_kernel("kernel_train_train", kernel_train_train, num_train, num_train, num_outputs)
    _check_scalar("learning_rate", learning_rate, positive=True)
    _check_scalar("ridge", ridge, positive=False)
    dtype = _float_dtype(kernel_train_train)
    targets = targets.astype(dtype)
    ridge = jnp.asarray(ridge, dtype)
    system = _eigensystem(kernel_train_train.astype(dtype), ridge, num_outputs=num_outputs, traced=traced)
    rate = jnp.asarray(learning_rate, dtype) / num_train  # τ = rate · t

    def predict_fn(
        t: float | jax.Array | None,
        outputs_train_0: jax.Array,
        outputs_test_0: jax.Array | None = None,
        kernel_test_train: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array | None]:
        """Linearised outputs after ``t`` steps (``None``: t → ∞) on the training and (if given) test points."""
        outputs_train_0 = jnp.asarray(outputs_train_0, dtype)
        if outputs_train_0.shape != targets.shape:
            raise ValueError(f"outputs_train_0 must have the targets' shape (n, K) = {targets.shape}, "
                             f"got {outputs_train_0.shape}")
        if (outputs_test_0 is None) != (kernel_test_train is None):
            raise ValueError("pass outputs_test_0 and kernel_test_train together (or neither), got outputs_test_0 "
                             f"{_shape(outputs_test_0)} and kernel_test_train {_shape(kernel_test_train)}")
        if outputs_test_0 is not None:
            outputs_test_0 = jnp.asarray(outputs_test_0, dtype)
            kernel_test_train = jnp.asarray(kernel_test_train, dtype)
            _check_test(outputs_test_0, kernel_test_train, num_train, num_outputs, traced)
        steps = jnp.asarray(jnp.inf if t is None else t, dtype)
        return _evolve(system, targets, rate, steps, outputs_train_0, outputs_test_0, kernel_test_train,
                       traced=traced)

    return predict_fn


def kernel_regression(
    kernel_train_train: jax.Array,
    targets: jax.Array,
    kernel_test_train: jax.Array,
    *,
    ridge: float = 0.0,
) -> jax.Array:
    r"""Kernel (ridge) regression with the NTK: the :math:`t → ∞` predictions from zero initial outputs.

    .. math::
       f_{\text{test}} = \bar Θ_{\text{test,train}} \big(\bar Θ + r\,\bar λ I\big)^{+} y

    with :math:`\bar Θ`, :math:`\bar λ` and the pseudo-inverse cutoff of :func:`gradient_descent_mse`, whose
    ``predict_fn(None, 0, 0, kernel_test_train)`` this is.

    Args:
      kernel_train_train: ``(n, n, K, K)`` or output-traced ``(n, n)``.
      targets: ``(n, K)``.
      kernel_test_train: ``(n_test, n, K, K)`` or ``(n_test, n)``, as ``kernel_train_train``.
      ridge: ``r ≥ 0``, relative to the mean eigenvalue of :math:`\bar Θ`.

    Returns:
      ``(n_test, K)`` predictions.

    Example:
      >>> import jax.numpy as jnp, ntkcv.predict
      >>> kernel = jnp.array([[2.0, 1.0], [1.0, 2.0]])
      >>> targets = jnp.array([[1.0], [-1.0]])
      >>> ntkcv.predict.kernel_regression(kernel, targets, jnp.array([[1.0, 0.5]])).round(4).tolist()
      [[0.5]]

    Reference: Lee et al., arXiv 1902.06720, eq. (16).
    """
    targets, kernel_test_train = jnp.asarray(targets), jnp.asarray(kernel_test_train)
    predict_fn = gradient_descent_mse(kernel_train_train, targets, ridge=ridge)
    dtype = _float_dtype(jnp.asarray(kernel_train_train))
    zeros_test = jnp.zeros((*kernel_test_train.shape[:1], *targets.shape[1:]), dtype)
    return predict_fn(None, jnp.zeros(targets.shape, dtype), zeros_test, kernel_test_train)[1]


def linearisation_measurement(
    apply_fn: Callable,
    *,
    learning_rate: float | Callable[[jax.Array], jax.Array],
    train: str = "train",
    test: str = "test",
    trace_axes: tuple[int, ...] = (-1,),
    implementation: str = "auto",
    ridge: float = 1e-6,
) -> Measurement:
    r"""A monitor measurement (:class:`ntkcv.measurement.Measurement`) of how far the network is from the lazy regime.

    At its first firing (step :math:`s_0`) it keeps the kernels :math:`Θ_0(\text{train}, \text{train})`,
    :math:`Θ_0(\text{test}, \text{train})` and the outputs :math:`f_0` on the probe sets ``train`` and ``test`` as
    state; at step :math:`s` the linearised network has been trained by :func:`gradient_descent_mse` on the ``train``
    set for the time :math:`\sum_{s_0 ≤ u < s} η_u` (a schedule is summed step by step). It returns

    - ``gap``: :math:`\|f_s - f^{\text{lin}}_s\| / \|f_s - f_0\|` on the test probes (0 while :math:`f_s = f_0`):
      near 0 in the lazy (kernel) regime, of order 1 once the network learns features (Lee et al. 2019, Fig. 5);
    - ``train_gap``: the same on the training probes;
    - ``accuracy`` (integer labels): the linearised network's accuracy on the test probes;
    - ``kernel_regression_accuracy`` (integer labels) or ``kernel_regression_loss`` (targets, the MSE
      :math:`\frac{1}{2n}\sum\|f - y\|^2`): of kernel regression with the *current* kernel (:func:`kernel_regression`,
      relative ``ridge``), the test performance the kernel alone would give.

    The linearised model describes the network only under gradient descent on the MSE loss, trained on exactly the
    ``train`` probe set, full batch: then a network in the lazy regime has ``gap`` → 0 as its width grows. Integer
    labels are one-hot targets. The kernels are computed here, beside the monitor's CVs (a second kernel of the
    training probes per firing); ``trace_axes=(-1,)`` uses :math:`Θ^{\text{tr}}/K ⊗ I_K`
    (see :func:`gradient_descent_mse`), ``()`` the full kernel (exact, :math:`(nK)^3` per firing).

    Args:
      apply_fn: ``apply_fn(params, x)``.
      learning_rate: η: a number, or a schedule of the step (an optax schedule).
      train, test: the probe sets' names; both need labels.
      trace_axes, implementation: as for :func:`ntkcv.ntk_fn`.
      ridge: the kernel regression's relative ridge.

    Reference: Lee et al., "Wide neural networks of any depth evolve as linear models under gradient descent",
    NeurIPS 2019, arXiv 1902.06720.
    """
    kernel_fn = ntk_fn(apply_fn, trace_axes=trace_axes, implementation=implementation, warn=False)

    def measured(params, probe_sets):
        for name in (train, test):
            if "labels" not in probe_sets[name]:
                raise ValueError(f"the linearisation measurement needs labels on the probe set {name!r}")
        x_train, x_test = probe_sets[train]["inputs"], probe_sets[test]["inputs"]
        return {"kernel_train_train": kernel_fn(params, x_train),
                "kernel_test_train": kernel_fn(params, x_test, x_train),
                "outputs_train": apply_fn(params, x_train), "outputs_test": apply_fn(params, x_test)}

    def init(params: Any, probe_sets: ProbeSets) -> State:
        initial = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(measured, params, probe_sets))
        return {"initial": initial, "has_initial": jnp.asarray(False), "start_step": jnp.asarray(0, jnp.int32)}

    def apply(params: Any, probe_sets: ProbeSets, state: State, step: jax.Array):
        now = measured(params, probe_sets)
        has = state["has_initial"]
        initial = jax.tree.map(lambda old, new: jnp.where(has, old, new), state["initial"], now)
        start = jnp.where(has, state["start_step"], step)
        labels_train, labels_test = probe_sets[train]["labels"], probe_sets[test]["labels"]
        num_outputs, dtype = now["outputs_train"].shape[-1], now["outputs_train"].dtype
        targets_train, targets_test = (_targets(y, num_outputs, dtype) for y in (labels_train, labels_test))
        if callable(learning_rate):
            time = jax.lax.fori_loop(start, step, lambda u, total: total + jnp.asarray(learning_rate(u), dtype),
                                     jnp.zeros((), dtype))
        else:
            time = learning_rate * (step - start).astype(dtype)
        predict_fn = gradient_descent_mse(initial["kernel_train_train"], targets_train)
        linear_train, linear_test = predict_fn(time, initial["outputs_train"], initial["outputs_test"],
                                               initial["kernel_test_train"])
        scalars = {"gap": _gap(now["outputs_test"], linear_test, initial["outputs_test"]),
                   "train_gap": _gap(now["outputs_train"], linear_train, initial["outputs_train"])}
        regression = kernel_regression(now["kernel_train_train"], targets_train, now["kernel_test_train"], ridge=ridge)
        if jnp.issubdtype(labels_test.dtype, jnp.integer):
            scalars["accuracy"] = jnp.mean(jnp.argmax(linear_test, -1) == labels_test)
            scalars["kernel_regression_accuracy"] = jnp.mean(jnp.argmax(regression, -1) == labels_test)
        else:
            scalars["kernel_regression_loss"] = 0.5 * jnp.mean(jnp.sum((regression - targets_test) ** 2, -1))
        new_state = {"initial": initial, "has_initial": jnp.asarray(True), "start_step": start.astype(jnp.int32)}
        return scalars, {}, new_state

    return Measurement(init, apply, frozenset({train, test}))


def _targets(labels: jax.Array, num_outputs: int, dtype: jnp.dtype) -> jax.Array:
    """Integer labels one-hot, real targets as they are, as ``(n, K)``."""
    if jnp.issubdtype(labels.dtype, jnp.integer):
        return jax.nn.one_hot(labels, num_outputs, dtype=dtype)
    return labels.reshape(labels.shape[0], -1).astype(dtype)


def _gap(outputs: jax.Array, linear: jax.Array, initial: jax.Array) -> jax.Array:
    """``‖f − f_lin‖ / ‖f − f_0‖``, 0 where the network has not moved."""
    moved = jnp.linalg.norm(outputs - initial)
    return jnp.where(moved > 0, jnp.linalg.norm(outputs - linear) / jnp.where(moved > 0, moved, 1.0), 0.0)


class _Eigensystem(NamedTuple):
    """``A = V diag(λ) Vᵀ``: the regularised train kernel acting on outputs, eigenvalues clipped at 0."""

    eigenvalues: jax.Array  # (m,)
    eigenvectors: jax.Array  # (m, m)
    cutoff: jax.Array  # eigenvalues at or below it are the null space at t = ∞


@functools.partial(jax.jit, static_argnames=("num_outputs", "traced"))
def _eigensystem(kernel: jax.Array, ridge: jax.Array, *, num_outputs: int, traced: bool) -> _Eigensystem:
    matrix = _as_matrix(kernel, traced, num_outputs)
    size = matrix.shape[0]
    eigenvalues, eigenvectors = jnp.linalg.eigh(matrix)
    eigenvalues = jnp.maximum(eigenvalues + ridge * jnp.trace(matrix) / size, 0.0)
    return _Eigensystem(eigenvalues, eigenvectors, size * jnp.finfo(matrix.dtype).eps * jnp.max(eigenvalues))


@functools.partial(jax.jit, static_argnames=("traced",))
def _evolve(system: _Eigensystem, targets: jax.Array, rate: jax.Array, steps: jax.Array, outputs_train_0: jax.Array,
            outputs_test_0: jax.Array | None, kernel_test_train: jax.Array | None, *, traced: bool):
    """``(f_train(t), f_test(t) or None)`` of :func:`gradient_descent_mse` for checked inputs."""
    (num_train, num_outputs), size = targets.shape, system.eigenvalues.shape[0]
    steps = jnp.broadcast_to(steps[..., None], (*steps.shape, size))
    fitted, response = _flow_factors(jnp.broadcast_to(system.eigenvalues, steps.shape), rate * steps, steps,
                                     system.cutoff)  # (*t, m)
    columns = num_outputs if traced else 1  # the outputs share A (traced), or are rows of the flattened system
    coefficients = system.eigenvectors.T @ (outputs_train_0 - targets).reshape(size, columns)  # Vᵀδ, (m, columns)
    change = jnp.einsum("ij,...j,jc->...ic", system.eigenvectors, fitted, coefficients)
    change = change.reshape((*steps.shape[:-1], num_train, num_outputs))
    f_train = jnp.broadcast_to(outputs_train_0, change.shape) - change
    if outputs_test_0 is None:
        return f_train, None
    cross = _as_matrix(kernel_test_train, traced, num_outputs) @ system.eigenvectors
    change = jnp.einsum("ij,...j,jc->...ic", cross, response, coefficients)
    change = change.reshape((*steps.shape[:-1], *outputs_test_0.shape))
    return f_train, jnp.broadcast_to(outputs_test_0, change.shape) - change


def _flow_factors(eigenvalues: jax.Array, time: jax.Array, steps: jax.Array, cutoff: jax.Array):
    """``(1 - e^{-τλ}, (1 - e^{-τλ})/λ)`` for ``τ = time`` (all of one shape), with the limits λ → 0 (τ) and, where
    ``steps`` is +∞, the pseudo-inverse ones (``[λ > cutoff]``, ``[λ > cutoff]/λ``)."""
    limit = steps == jnp.inf
    time = jnp.where(limit, 0.0, time)
    x = time * eigenvalues
    eps = jnp.finfo(x.dtype).eps
    small = jnp.abs(x) <= eps
    fitted = -jnp.expm1(-x)
    response = time * jnp.where(small, 1.0 - x / 2, fitted / jnp.where(small, 1.0, x))  # τ (1 - e^{-x})/x
    kept = eigenvalues > cutoff
    fitted = jnp.where(limit, kept.astype(x.dtype), fitted)
    response = jnp.where(limit, jnp.where(kept, 1.0 / jnp.where(kept, eigenvalues, 1.0), 0.0), response)
    return fitted, response


def _float_dtype(kernel: jax.Array) -> jnp.dtype:
    """The kernel's dtype if floating, else the default float: all arrays are cast to it (no implicit promotion)."""
    return kernel.dtype if jnp.issubdtype(kernel.dtype, jnp.floating) else jax.dtypes.canonicalize_dtype(float)


def _as_matrix(kernel: jax.Array, traced: bool, num_outputs: int) -> jax.Array:
    """The kernel acting on outputs: traced ``Θ/K`` (shared by the outputs), or the full one flattened."""
    return kernel / num_outputs if traced else flatten_kernel(kernel)


def _check_targets(targets: jax.Array) -> tuple[int, int]:
    if targets.ndim != 2:
        raise ValueError(f"targets must be (n, K), got shape {targets.shape} (one output: targets[:, None])")
    if jnp.issubdtype(targets.dtype, jnp.complexfloating):
        raise TypeError(f"targets must be real, got dtype {targets.dtype}")
    return targets.shape


def _check_kernel(name: str, kernel: jax.Array, rows: int, num_train: int, num_outputs: int) -> bool:
    """Whether ``kernel`` is output-traced ``(rows, n)``; else it must be full ``(rows, n, K, K)``."""
    traced, full = (rows, num_train), (rows, num_train, num_outputs, num_outputs)
    if kernel.shape not in (traced, full):
        raise ValueError(f"{name} must be output-traced {traced} or full {full} for targets (n, K) = "
                         f"({num_train}, {num_outputs}), got shape {kernel.shape}")
    return kernel.shape == traced


def _check_test(outputs_test_0: jax.Array, kernel_test_train: jax.Array, num_train: int, num_outputs: int,
                traced: bool) -> None:
    num_test = kernel_test_train.shape[0] if kernel_test_train.ndim else 0
    kind = "output-traced" if traced else "full"
    if _check_kernel("kernel_test_train", kernel_test_train, num_test, num_train, num_outputs) != traced:
        raise ValueError(f"kernel_test_train must be {kind} like kernel_train_train, got shape "
                         f"{kernel_test_train.shape}")
    if outputs_test_0.shape != (num_test, num_outputs):
        raise ValueError(f"outputs_test_0 must be (n_test, K) = {(num_test, num_outputs)} for kernel_test_train "
                         f"{kernel_test_train.shape}, got {outputs_test_0.shape}")


def _check_scalar(name: str, value: float, *, positive: bool) -> None:
    """A scalar, ``> 0`` (``positive``) or ``≥ 0``; the sign is checked only when the value is concrete."""
    if jnp.ndim(value) != 0:
        raise ValueError(f"{name} must be a scalar, got shape {jnp.shape(value)}")
    try:
        number = float(value)
    except jax.errors.ConcretizationTypeError:  # traced under jit: not checkable here
        return
    if not (number > 0 if positive else number >= 0):
        raise ValueError(f"{name} must be {'> 0' if positive else '≥ 0'}, got {value!r}")


def _shape(array: jax.Array | None) -> str:
    return "None" if array is None else str(jnp.shape(array))
