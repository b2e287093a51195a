r"""Loss curvature: the top eigenvalues and trace of the training loss's Hessian and Gauss–Newton matrix.

Under full-batch gradient descent with step size :math:`η` the sharpness, the largest eigenvalue of the Hessian
:math:`∇^2 L(θ)`, rises until it hovers at :math:`2/η`, the *edge of stability* (Cohen et al. 2021). This module
measures it and its Gauss–Newton part, for a loss averaged over ``n`` samples with outputs
:math:`f_i = f(θ, x_i) ∈ ℝ^K` and Jacobian :math:`J ∈ ℝ^{nK × P}` (rows ordered ``(sample, output)``):

.. math::
   ∇^2 L = G + \frac1n \sum_i \sum_a \frac{∂\ell}{∂f_{ia}} ∇^2 f_{ia}, \qquad
   G = \frac1n J^⊤ H J, \qquad H = \operatorname{blockdiag}_i \frac{∂^2 \ell(f_i, y_i)}{∂f_i^2}

- MSE, :math:`L = \frac1{2n} \sum_i \|f_i - y_i\|^2`: :math:`H_i = I_K`, so :math:`G = J^⊤J / n` has the nonzero
  spectrum of :math:`Θ/n`, with :math:`Θ = JJ^⊤` the full (``nK × nK``) empirical NTK;
- softmax cross-entropy, :math:`L = \frac1n \sum_i -\log \operatorname{softmax}(f_i)_{y_i}`:
  :math:`H_i = \operatorname{diag}(p_i) - p_i p_i^⊤` with :math:`p_i = \operatorname{softmax}(f_i)`.

Neither :math:`H` depends on the targets, so neither does :math:`G`: the Gauss–Newton functions take no targets.
For cross-entropy :math:`H_i = A_i A_i^⊤` with :math:`A_i = \operatorname{diag}(\sqrt{p_i}) - p_i \sqrt{p_i}^⊤`
(since :math:`\sum_a p_{ia} = 1`), so :math:`G = \frac1n (A^⊤J)^⊤(A^⊤J)` has the nonzero spectrum of the symmetric
positive semi-definite

.. math::
   M = \frac1n A^⊤ Θ A \qquad (\text{the same spectrum as } \tfrac1n H^{1/2} Θ H^{1/2}),

which is what the functions below decompose, exactly (``eigvalsh`` of :math:`M` built from Θ) or matrix-free (Lanczos
and Hutch++ on :math:`v ↦ A^⊤ Θ A v / n`, with the operator :func:`ntkcv.ntk_operator`). :math:`A_i` costs
:math:`O(K)` per product and needs no eigendecomposition of :math:`H_i`. For MSE, :math:`A = I`.

The Hessian functions take any scalar ``loss_fn(params)`` and use Hessian-vector products by forward-over-reverse
differentiation on the flattened parameters; the Hessian may be indefinite, and its top eigenvalue is the largest
algebraic one (PyHessian, Yao et al. 2020, does the same in PyTorch).

All functions are pure and ``jit``-able with ``params`` and ``x`` as arguments; the exact-or-matrix-free choice
depends only on static shapes::

    sharpness_fn = jax.jit(lambda p, x: ggn_top_eigenvalues(apply_fn, p, x, loss="mse", key=jax.random.key(0)))

Called outside ``jit``, each call traces (and compiles) anew: wrap repeated calls in ``jax.jit``.

References:
  Cohen, Kaur, Li, Kolter & Talwalkar, "Gradient descent on neural networks typically occurs at the edge of
  stability", ICLR 2021, arXiv 2103.00065. Martens, "New insights and perspectives on the natural gradient method",
  JMLR 21 (2020) (the generalised Gauss–Newton matrix). Yao, Gholami, Keutzer & Mahoney, "PyHessian: neural networks
  through the lens of the Hessian", arXiv 1912.07145. Meyer, Musco, Musco & Woodruff, "Hutch++: optimal stochastic
  trace estimation", SOSA 2021, arXiv 2010.09649.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from ntkcv.cv.estimators import Estimate, top_eigenvalues_lanczos, trace_hutchpp
from ntkcv.measurement import Measurement, ProbeSets, State, prefer_matrix_free
from ntkcv.ntk import flatten_kernel, ntk_fn, ntk_operator

__all__ = [
    "LOSSES",
    "cross_entropy",
    "curvature_measurement",
    "ggn_top_eigenvalues",
    "ggn_trace",
    "hessian_top_eigenvalues",
    "hessian_trace",
    "make_loss_fn",
    "mse",
    "prefer_matrix_free_ggn",
]

#: Loss names accepted by :func:`make_loss_fn` and the Gauss–Newton functions.
LOSSES = ("mse", "cross_entropy")

LossName = Literal["mse", "cross_entropy"]
MatrixFree = bool | Literal["auto"]


# --------------------------------------------------------------------------------------------------- losses


def mse(outputs: jax.Array, targets: jax.Array) -> jax.Array:
    r"""Mean squared error :math:`L = \frac1{2n} \sum_{i=1}^n \|f_i - y_i\|^2` of outputs ``(n, K)``.

    Args:
      outputs: model outputs :math:`f`, ``(n, K)``.
      targets: real targets :math:`y` of the outputs' shape, or integer class labels ``(n,)``, which are one-hot
        encoded with ``K`` classes (as ``ntkcv train`` does for MSE on a classification task).
    """
    _check_outputs(outputs, "outputs")
    targets = _check_targets(outputs, targets)
    if jnp.issubdtype(targets.dtype, jnp.integer):
        targets = jax.nn.one_hot(targets, outputs.shape[-1], dtype=outputs.dtype)
    return 0.5 * jnp.mean(jnp.sum((outputs - targets) ** 2, axis=-1))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    r"""Mean softmax cross-entropy :math:`L = -\frac1n \sum_{i=1}^n \sum_a t_{ia} \log\operatorname{softmax}(f_i)_a`.

    Args:
      logits: model outputs :math:`f`, ``(n, K)``.
      labels: integer class labels ``(n,)`` (:math:`t_i` the one-hot vector of the label), or one-hot or
        probability targets :math:`t` of the logits' shape.
    """
    _check_outputs(logits, "logits")
    labels = _check_targets(logits, labels)
    log_p = jax.nn.log_softmax(logits, axis=-1)
    if jnp.issubdtype(labels.dtype, jnp.integer):
        return -jnp.mean(jnp.take_along_axis(log_p, labels[:, None], axis=-1))
    return -jnp.mean(jnp.sum(labels * log_p, axis=-1))


_LOSS_FNS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {"mse": mse, "cross_entropy": cross_entropy}


def make_loss_fn(apply_fn: Callable[[Any, jax.Array], jax.Array], x: jax.Array, y: jax.Array, *,
                 loss: LossName) -> Callable[[Any], jax.Array]:
    """The training loss as a function of the parameters alone, for :func:`hessian_top_eigenvalues`.

    Args:
      apply_fn: ``apply_fn(params, x) -> (n, K)``.
      x: inputs ``(n, …)``.
      y: targets or labels, as :func:`mse` or :func:`cross_entropy` take them.
      loss: ``"mse"`` (:func:`mse`) or ``"cross_entropy"`` (:func:`cross_entropy`).

    Returns:
      ``loss_fn(params) -> scalar``, pure.
    """
    loss_of = _LOSS_FNS[_check_loss(loss)]
    return lambda params: loss_of(apply_fn(params, x), y)


# -------------------------------------------------------------------------------------------------- Hessian


def hessian_top_eigenvalues(loss_fn: Callable[[Any], jax.Array], params: Any, key: jax.Array, *, k: int = 1,
                            num_matvecs: int = 30) -> Estimate:
    r"""The ``k`` largest (algebraic) eigenvalues of the Hessian :math:`∇^2 L(θ)`, by Lanczos.

    The Hessian acts on the flattened parameters :math:`θ ∈ ℝ^P` (``jax.flatten_util.ravel_pytree``) through
    forward-over-reverse products, :math:`v ↦ ∂_ε ∇L(θ + εv)|_{ε=0}` (``jax.jvp`` of ``jax.grad``), each about
    two gradient evaluations; it is never formed. :func:`ntkcv.cv.top_eigenvalues_lanczos` runs ``num_matvecs``
    steps (at most ``P``) with full reorthogonalisation. Under gradient descent with step :math:`η` the first
    value approaches :math:`2/η` at the edge of stability (Cohen et al. 2021).

    Args:
      loss_fn: ``loss_fn(params) -> scalar`` (e.g. from :func:`make_loss_fn`), twice differentiable.
      params: the point :math:`θ`, a pytree of floating-point arrays.
      key: randomness of the Lanczos start vector.
      k: how many eigenvalues.
      num_matvecs: Lanczos steps (Hessian-vector products), ``k ≤ num_matvecs``; capped at ``P``.

    Returns:
      :class:`~ntkcv.cv.Estimate` of shape ``(k,)``, values descending; ``stderr`` is the Ritz residual, a bound
      :math:`r_i` such that an eigenvalue of the Hessian lies within :math:`r_i` of value :math:`i`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from ntkcv.curvature import hessian_top_eigenvalues, make_loss_fn
      >>> apply_fn = lambda p, x: jnp.tanh(x @ p["w"]) @ p["v"]
      >>> params = {"w": jnp.ones((3, 4)) / 2, "v": jnp.ones((4, 2))}
      >>> x, y = jnp.linspace(-1, 1, 15).reshape(5, 3), jnp.array([0, 1, 1, 0, 1])
      >>> loss_fn = make_loss_fn(apply_fn, x, y, loss="cross_entropy")
      >>> hessian_top_eigenvalues(loss_fn, params, jax.random.key(0), k=2).value.shape
      (2,)

    References: Yao et al., PyHessian, arXiv 1912.07145; Cohen et al., arXiv 2103.00065.
    """
    hvp, dim, dtype = _hessian_operator(loss_fn, params)
    return top_eigenvalues_lanczos(hvp, key, n=dim, k=_check_k(k, dim), num_matvecs=min(num_matvecs, dim),
                                   dtype=dtype)


def hessian_trace(loss_fn: Callable[[Any], jax.Array], params: Any, key: jax.Array, *,
                  num_matvecs: int = 60) -> Estimate:
    r""":math:`\operatorname{tr} ∇^2 L(θ)` by Hutch++ on Hessian-vector products (see
    :func:`hessian_top_eigenvalues` for the products and :func:`ntkcv.cv.trace_hutchpp` for the estimator).

    Args:
      loss_fn: ``loss_fn(params) -> scalar``.
      params: the point :math:`θ`.
      key: randomness of the sketch and the probes.
      num_matvecs: Hessian-vector products, at least 3; capped at ``3P``.

    Returns:
      Scalar :class:`~ntkcv.cv.Estimate` with the Hutchinson standard error of the deflated remainder.

    References: Meyer et al., Hutch++, arXiv 2010.09649; Yao et al., PyHessian, arXiv 1912.07145.
    """
    hvp, dim, dtype = _hessian_operator(loss_fn, params)
    return trace_hutchpp(hvp, key, n=dim, num_matvecs=min(num_matvecs, 3 * dim), dtype=dtype)


def _hessian_operator(loss_fn, params) -> tuple[Callable[[jax.Array], jax.Array], int, Any]:
    """``v ↦ ∇²L v`` on the flattened parameters, their number and dtype."""
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(params), got {type(loss_fn).__name__}")
    flat, unravel = ravel_pytree(params)
    if flat.size == 0 or not jnp.issubdtype(flat.dtype, jnp.floating):
        raise ValueError(f"params must hold floating-point arrays with at least one entry; got {flat.size} entries "
                         f"of dtype {flat.dtype}")
    out = jax.eval_shape(loss_fn, params)
    if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != ():
        shape = getattr(out, "shape", jax.tree_util.tree_map(lambda leaf: leaf.shape, out))
        raise ValueError(f"loss_fn must return a scalar, got {shape}")
    gradient = lambda w: ravel_pytree(jax.grad(loss_fn)(unravel(w)))[0]  # noqa: E731
    return (lambda v: jax.jvp(gradient, (flat,), (v.astype(flat.dtype),))[1]), flat.size, flat.dtype


# ------------------------------------------------------------------------------------------- Gauss–Newton


def ggn_top_eigenvalues(
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    params: Any,
    x: jax.Array,
    *,
    loss: LossName,
    key: jax.Array,
    k: int = 1,
    matrix_free: MatrixFree = "auto",
    num_matvecs: int = 30,
    chunk_size: int | None = None,
) -> Estimate:
    r"""The ``k`` largest eigenvalues of the Gauss–Newton matrix :math:`G` of the loss ``loss`` over ``x``.

    Those of :math:`M = A^⊤ΘA/n` (the module docstring): :math:`Θ/n` for MSE, :math:`H^{1/2}ΘH^{1/2}/n` for
    cross-entropy. :math:`G` does not depend on the targets, so none are taken.

    - exact (``matrix_free=False``): Θ from ``ntkcv.ntk_fn(apply_fn, trace_axes=())``, then ``eigvalsh`` of the
      ``nK × nK`` matrix :math:`M`; ``stderr`` is 0. Memory :math:`O((nK)^2)`.
    - matrix-free (``True``): Lanczos (:func:`ntkcv.cv.top_eigenvalues_lanczos`) on
      :math:`v ↦ A^⊤ Θ A v / n` with :func:`ntkcv.ntk_operator`; ``stderr`` is the Ritz residual bound.
    - ``"auto"``: matrix-free when ``num_matvecs`` operator products are estimated to cost fewer FLOPs than the
      exact eigendecomposition (see :func:`prefer_matrix_free_ggn`); decided from shapes, so fine under ``jit``.

    Args:
      apply_fn: ``apply_fn(params, x) -> (n, K)``; samples must not interact.
      params: the parameters.
      x: inputs ``(n, …)``: the batch the loss averages over (the full training set for full-batch GD).
      loss: ``"mse"`` or ``"cross_entropy"`` (see :func:`mse`, :func:`cross_entropy`).
      key: randomness of the Lanczos start vector (unused by the exact path).
      k: how many eigenvalues, at most ``nK``.
      matrix_free: ``True``, ``False`` or ``"auto"``.
      num_matvecs: Lanczos steps (``k ≤ num_matvecs``; capped at ``nK``).
      chunk_size: samples per forward or backward pass of the matrix-free operator, and of the softmax
        probabilities (bounds activation memory); ``None``: all at once. Θ on the exact path is tiled by
        :func:`ntkcv.ntk_fn` to its memory budget.

    Returns:
      :class:`~ntkcv.cv.Estimate` of shape ``(k,)``, values descending.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from ntkcv.curvature import ggn_top_eigenvalues
      >>> apply_fn = lambda p, x: jnp.tanh(x @ p["w"]) @ p["v"]
      >>> params = {"w": jnp.ones((3, 4)) / 2, "v": jnp.ones((4, 2))}
      >>> sharpness_fn = jax.jit(lambda p, x: ggn_top_eigenvalues(apply_fn, p, x, loss="mse", key=jax.random.key(0)))
      >>> sharpness_fn(params, jnp.linspace(-1, 1, 15).reshape(5, 3)).value.shape
      (1,)

    References: Martens, JMLR 21 (2020) (the Gauss–Newton matrix); Cohen et al., arXiv 2103.00065.
    """
    n, num_outputs = _ggn_shapes(apply_fn, params, x, loss, matrix_free)
    dim = n * num_outputs
    k = _check_k(k, dim)
    num_matvecs = min(num_matvecs, dim)
    if _use_matrix_free(matrix_free, apply_fn, params, x, "top_eigenvalues", num_matvecs):
        matvec, dtype = _ggn_operator(apply_fn, params, x, loss, chunk_size)
        return top_eigenvalues_lanczos(matvec, key, n=dim, k=k, num_matvecs=num_matvecs, dtype=dtype)
    kernel = flatten_kernel(ntk_fn(apply_fn, trace_axes=(), warn=False)(params, x)).reshape(n, num_outputs, n,
                                                                                          num_outputs)
    if loss == "cross_entropy":
        factor = _softmax_hessian_factor(apply_fn(params, x))
        kernel = jnp.einsum("ica,icjd,jdb->iajb", factor, kernel, factor)
    matrix = kernel.reshape(dim, dim) / n
    values = jnp.linalg.eigvalsh(0.5 * (matrix + matrix.T))[::-1][:k]
    return Estimate(values, jnp.zeros_like(values))


def ggn_trace(
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    params: Any,
    x: jax.Array,
    *,
    loss: LossName,
    key: jax.Array,
    matrix_free: MatrixFree = "auto",
    num_matvecs: int = 60,
    chunk_size: int | None = None,
) -> Estimate:
    r"""The trace of the Gauss–Newton matrix, :math:`\operatorname{tr} G = \frac1n \sum_i \operatorname{tr} H_iΘ_{ii}`.

    Only Θ's ``n`` diagonal ``K × K`` blocks :math:`Θ_{ii}` enter, so the exact path never builds Θ:

    - exact (``matrix_free=False``): the blocks from ``ntkcv.ntk_fn(apply_fn, trace_axes=(), diagonal=True)``,
      about ``nK`` per-sample backward passes; ``stderr`` is 0. (For MSE, :math:`\operatorname{tr} G = \frac1n
      \sum_i \|∂f_i/∂θ\|_F^2`.)
    - matrix-free (``True``): Hutch++ (:func:`ntkcv.cv.trace_hutchpp`) on :math:`v ↦ A^⊤ΘAv/n`, with its
      standard error.
    - ``"auto"``: matrix-free only when ``num_matvecs`` operator products cost less than ``nK`` backward passes,
      i.e. when :math:`K > \frac43 \text{num\_matvecs}` (see :func:`prefer_matrix_free_ggn`).

    Args:
      apply_fn, params, x, loss, chunk_size: as for :func:`ggn_top_eigenvalues`.
      key: randomness of the Hutch++ sketch and probes (unused by the exact path).
      matrix_free: ``True``, ``False`` or ``"auto"``.
      num_matvecs: operator products of Hutch++ (at least 3; capped at ``3nK``).

    Returns:
      Scalar :class:`~ntkcv.cv.Estimate`.

    References: Martens, JMLR 21 (2020); Meyer et al., Hutch++, arXiv 2010.09649.
    """
    n, num_outputs = _ggn_shapes(apply_fn, params, x, loss, matrix_free)
    dim = n * num_outputs
    num_matvecs = min(num_matvecs, 3 * dim)
    if _use_matrix_free(matrix_free, apply_fn, params, x, "trace", num_matvecs):
        matvec, dtype = _ggn_operator(apply_fn, params, x, loss, chunk_size)
        return trace_hutchpp(matvec, key, n=dim, num_matvecs=num_matvecs, dtype=dtype)
    blocks = ntk_fn(apply_fn, trace_axes=(), diagonal=True, warn=False)(params, x)  # (n, K, K)
    if loss == "cross_entropy":
        factor = _softmax_hessian_factor(_outputs(apply_fn, params, x, chunk_size))
        value = jnp.einsum("ica,icd,ida->", factor, blocks, factor) / n
    else:
        value = jnp.einsum("icc->", blocks) / n
    return Estimate(value, jnp.zeros_like(value))


def curvature_measurement(
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    *,
    loss: str,
    learning_rate: float | Callable[[jax.Array], jax.Array],
    hessian: bool = True,
    traces: bool = True,
    matrix_free: bool | str = "auto",
    num_matvecs: int = 30,
    seed: int = 0,
) -> Measurement:
    r"""A monitor measurement (:class:`ntkcv.measurement.Measurement`) of the loss's sharpness on the training batch.

    At each firing, on the probe set ``"batch"`` (the training batch of the step: :class:`ntkcv.NTKMonitor` passes it
    when called with ``batch=(inputs, targets)``):

    - ``ggn_max`` (and ``ggn_max_stderr``): the top eigenvalue of the Gauss–Newton matrix,
      :func:`ggn_top_eigenvalues`; ``ggn_trace`` (and ``ggn_trace_stderr``), :func:`ggn_trace`;
    - ``hessian_max``, ``hessian_trace`` and their ``_stderr`` (``hessian=True``): the loss Hessian's, by Lanczos and
      Hutch++ on Hessian-vector products (:func:`hessian_top_eigenvalues`, :func:`hessian_trace`);
    - ``two_over_lr``: :math:`2/η_s`, the edge of stability of gradient descent with step :math:`η_s` at this step
      (Cohen et al. 2021): under full-batch gradient descent the sharpness rises to about this value and hovers there.

    Args:
      apply_fn: ``apply_fn(params, x)``.
      loss: ``"mse"`` or ``"cross_entropy"`` (see :func:`make_loss_fn`), the loss of the training loop.
      learning_rate: η: a number, or a schedule of the step (an optax schedule).
      hessian: also the Hessian's top eigenvalue and trace (each a Lanczos or Hutch++ run of ``num_matvecs``
        Hessian-vector products).
      traces: also the traces.
      matrix_free: the GGN's path, as for :func:`ggn_top_eigenvalues`.
      num_matvecs, seed: budget and randomness of the Krylov and trace estimators.

    Reference: Cohen, Kaur, Li, Kolter & Talwalkar, "Gradient descent on neural networks typically occurs at the edge
    of stability", ICLR 2021, arXiv 2103.00065.
    """
    loss = _check_loss(loss)

    def init(params: Any, probe_sets: ProbeSets) -> State:
        del params, probe_sets
        return {}

    def apply(params: Any, probe_sets: ProbeSets, state: State, step: jax.Array):
        x, y = probe_sets["batch"]["inputs"], probe_sets["batch"]["labels"]
        keys = jax.random.split(jax.random.key(seed), 4)
        estimates = {"ggn_max": ggn_top_eigenvalues(apply_fn, params, x, loss=loss, key=keys[0],
                                                    matrix_free=matrix_free, num_matvecs=num_matvecs)}
        if traces:
            estimates["ggn_trace"] = ggn_trace(apply_fn, params, x, loss=loss, key=keys[1], matrix_free=matrix_free,
                                               num_matvecs=num_matvecs)
        if hessian:
            loss_fn = make_loss_fn(apply_fn, x, y, loss=loss)
            estimates["hessian_max"] = hessian_top_eigenvalues(loss_fn, params, keys[2], num_matvecs=num_matvecs)
            if traces:
                estimates["hessian_trace"] = hessian_trace(loss_fn, params, keys[3], num_matvecs=num_matvecs)
        scalars = {}
        for name, estimate in estimates.items():
            scalars[name], scalars[f"{name}_stderr"] = jnp.ravel(estimate.value)[0], jnp.ravel(estimate.stderr)[0]
        rate = learning_rate(step) if callable(learning_rate) else learning_rate
        scalars["two_over_lr"] = 2.0 / jnp.asarray(rate, jnp.result_type(float))
        return scalars, {}, state

    return Measurement(init, apply, frozenset({"batch"}))


def prefer_matrix_free_ggn(apply_fn: Callable[[Any, jax.Array], jax.Array], params: Any, x: jax.Array, *,
                           estimate: Literal["top_eigenvalues", "trace"], num_matvecs: int) -> bool:
    r"""Whether the matrix-free Gauss–Newton estimate is expected to be cheaper than the exact one, from shapes alone.

    Both sides come from the same FLOP model as :func:`ntkcv.ntk.matvec_flops` (one operator product over ``n``
    samples ≈ ``4n`` forward passes :math:`F`; a backward pass ≈ ``3F``), :math:`c = ` ``matvec_flops(…,
    trace_axes=())``:

    - ``"top_eigenvalues"``: the monitor's rule (:func:`ntkcv.measurement.prefer_matrix_free` with one probe):
      matrix-free when :math:`\text{num\_matvecs} · c < \text{EIGH\_FLOPS\_PER\_N3} · (nK)^3`;
    - ``"trace"``: matrix-free when :math:`\text{num\_matvecs} · c < nK · 3F = \frac34 K c`, i.e.
      :math:`K > \frac43 \text{num\_matvecs}` (the exact trace needs ``nK`` per-sample backward passes).
    """
    if estimate == "trace":
        return num_matvecs < 0.75 * _output_shape(apply_fn, params, x)[1]
    if estimate != "top_eigenvalues":
        raise ValueError(f"estimate must be 'top_eigenvalues' or 'trace', got {estimate!r}")
    # imported here, not at the top: the monitor's measurement module may import this one
    return prefer_matrix_free(apply_fn, params, x, trace_axes=(), num_probes=1, num_matvecs=num_matvecs)


def _use_matrix_free(matrix_free, apply_fn, params, x, estimate, num_matvecs) -> bool:
    if matrix_free == "auto":
        return prefer_matrix_free_ggn(apply_fn, params, x, estimate=estimate, num_matvecs=num_matvecs)
    return bool(matrix_free)


def _ggn_operator(apply_fn, params, x, loss, chunk_size) -> tuple[Callable[[jax.Array], jax.Array], Any]:
    """``v ↦ A^⊤ΘAv/n`` on ``v ∈ ℝ^{nK}`` (rows ``(sample, output)``), and its dtype."""
    op = ntk_operator(apply_fn, params, x, trace_axes=(), chunk_size=chunk_size)
    n = x.shape[0]
    if loss == "mse":
        return (lambda v: op.matvec(v) / n), op.dtype
    p = jax.nn.softmax(_outputs(apply_fn, params, x, chunk_size), axis=-1)
    root = jnp.sqrt(p)

    def matvec(v):
        v = v.reshape(p.shape)
        u = root * v - p * jnp.sum(root * v, axis=-1, keepdims=True)  # A v
        w = op.matvec(u.reshape(-1)).reshape(p.shape)
        return (root * (w - jnp.sum(p * w, axis=-1, keepdims=True))).reshape(-1) / n  # Aᵀ w / n

    return matvec, op.dtype


def _outputs(apply_fn, params, x, chunk_size: int | None) -> jax.Array:
    """``apply_fn(params, x)``, in passes of ``chunk_size`` samples when given."""
    if chunk_size is None:
        return apply_fn(params, x)
    return jax.lax.map(lambda sample: apply_fn(params, sample[None])[0], x, batch_size=chunk_size)


def _softmax_hessian_factor(logits: jax.Array) -> jax.Array:
    """``A_i = diag(√p_i) − p_i √p_iᵀ``, ``(n, K, K)``, with ``A_i A_iᵀ = diag(p_i) − p_i p_iᵀ``."""
    p = jax.nn.softmax(logits, axis=-1)
    root = jnp.sqrt(p)
    return jax.vmap(jnp.diag)(root) - p[:, :, None] * root[:, None, :]


# ------------------------------------------------------------------------------------------------- checks


def _check_loss(loss: Any) -> str:
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(map(repr, LOSSES))}; got {loss!r}")
    return loss


def _check_k(k: Any, dim: int) -> int:
    if not isinstance(k, int) or not 1 <= k <= dim:
        raise ValueError(f"k must be an integer with 1 <= k <= {dim} (the matrix's size); got {k!r}")
    return k


def _check_outputs(outputs: jax.Array, name: str) -> None:
    if jnp.ndim(outputs) != 2:
        raise ValueError(f"{name} must have shape (n, K), got {jnp.shape(outputs)}")


def _check_targets(outputs: jax.Array, targets: jax.Array) -> jax.Array:
    targets = jnp.asarray(targets)
    if jnp.issubdtype(targets.dtype, jnp.integer):
        if targets.shape != outputs.shape[:1]:
            raise ValueError(f"integer labels must have shape (n,) = {outputs.shape[:1]} for outputs of shape "
                             f"{outputs.shape}; got {targets.shape}")
    elif targets.shape != outputs.shape:
        raise ValueError(f"targets must be integer labels (n,) or real targets of the outputs' shape "
                         f"{outputs.shape}; got shape {targets.shape} and dtype {targets.dtype}")
    return targets


def _output_shape(apply_fn, params, x) -> tuple[int, int]:
    if not hasattr(x, "shape") or len(x.shape) == 0:
        raise ValueError(f"x must be an array of inputs (n, …), got {type(x).__name__} of shape "
                         f"{getattr(x, 'shape', None)}")
    shape = jax.eval_shape(apply_fn, params, x).shape
    if len(shape) != 2 or shape[0] != x.shape[0]:
        raise ValueError(f"the Gauss–Newton matrix needs apply_fn to return outputs (n, K) with n = {x.shape[0]}; "
                         f"got shape {shape}")
    return shape


def _ggn_shapes(apply_fn, params, x, loss, matrix_free) -> tuple[int, int]:
    _check_loss(loss)
    if matrix_free not in (True, False, "auto"):
        raise ValueError(f"matrix_free must be True, False or 'auto'; got {matrix_free!r}")
    return _output_shape(apply_fn, params, x)
