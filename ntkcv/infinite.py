r"""The infinite-width NNGP and NTK of fully connected networks: what empirical kernels converge to.

A network of ``depth`` hidden layers :math:`l = 1 … L` of width :math:`n_l` and one linear readout maps
:math:`x ∈ ℝ^d` (an input ``(n, ...)`` is flattened to ``(n, d)``) to :math:`f(x) = h^{L+1}(x)`, with
:math:`h^1 = \frac{σ_w}{\sqrt d} W^0 x + σ_b b^0`, :math:`h^{l+1} = \frac{σ_w}{\sqrt{n_l}} W^l φ(h^l) + σ_b b^l`
and all :math:`W, b ∼ 𝒩(0, 1)` in the ``"ntk"`` parameterisation (neural-tangents' ``stax``). As all
:math:`n_l → ∞`, each output is a Gaussian process with covariance :math:`Σ^{L+1}` (the NNGP) and the
empirical NTK of one output tends to the deterministic :math:`Θ^{L+1}` (Jacot et al. 2018):

.. math::
   Σ^1 = σ_w^2 \frac{x·x'}{d} + σ_b^2, \qquad
   Σ^{l+1} = σ_w^2\, 𝔼[φ(u)φ(v)] + σ_b^2, \qquad
   \dot Σ^{l+1} = σ_w^2\, 𝔼[φ'(u)φ'(v)], \qquad (u, v) ∼ 𝒩\Big(0, \begin{pmatrix}
   Σ^l(x, x) & Σ^l(x, x') \\ Σ^l(x, x') & Σ^l(x', x')\end{pmatrix}\Big),

   Θ^1 = Σ^1, \qquad Θ^{l+1} = Σ^{l+1} + Θ^l\, \dot Σ^{l+1}.

With :math:`K` outputs the limit is :math:`Θ^{L+1} ⊗ I_K`; these functions return the ``(n₁, n₂)`` kernel of
one output. The expectations are closed forms for ``"relu"`` (the arc-cosine kernel, Cho & Saul 2009;
Arora et al. 2019), with :math:`\cos ϑ = Σ_{12}/\sqrt{Σ_{11}Σ_{22}}`,
:math:`𝔼[φφ] = \frac{\sqrt{Σ_{11}Σ_{22}}}{2π}(\sin ϑ + (π - ϑ)\cos ϑ)`, :math:`𝔼[φ'φ'] = \frac{π - ϑ}{2π}`;
for ``"erf"`` (Williams 1997), :math:`𝔼[φφ] = \frac2π \arcsin \frac{2Σ_{12}}{\sqrt{(1 + 2Σ_{11})(1 + 2Σ_{22})}}`,
:math:`𝔼[φ'φ'] = \frac4π \big((1 + 2Σ_{11})(1 + 2Σ_{22}) - 4Σ_{12}^2\big)^{-1/2}`; and for ``"identity"``
(alias ``"linear"``), :math:`Σ_{12}` and 1. Any other elementwise :math:`φ` (``"tanh"``, ``"gelu"`` in
``jax.nn.gelu``'s default tanh approximation, as Flax's ``nn.gelu``, ``"sigmoid"``, or a callable mapping a
scalar to a scalar) is integrated by a 64 × 64-point Gauss–Hermite rule (:math:`2·64^2` evaluations of
:math:`φ` and :math:`φ'` per kernel entry and layer), :math:`φ'` by ``jax.grad``. For smooth :math:`φ` it is
accurate to ~1e-12 at variances ≲ 1; features of :math:`φ, φ'` much narrower than the Gaussian's spread lose
digits (erf' at variance 4: ~1e-3), and a kink (a callable relu) leaves about two (use ``"relu"``).

**Standard parameterisation** (``"standard"``): :math:`h^{l+1} = W^l φ(h^l) + b^l` with
:math:`W^l_{ij} ∼ 𝒩(0, σ_w^2/n_l)`, :math:`b^l ∼ 𝒩(0, σ_b^2)`, every parameter trained at the same rate. A Flax
``nn.Dense`` network with its default init is :math:`σ_w = 1, σ_b = 0` (its truncated normal weights change the
limit only through the first layer, whose pre-activations are Gaussian only as :math:`d` grows). The forward
pass, hence the NNGP, is that of the ``"ntk"`` parameterisation, but a hidden layer's weight gradients carry
:math:`φ(h^l)·φ(h^{l})' ≈ n_l\, 𝔼[φφ]`, so with all hidden widths :math:`n` the empirical NTK grows like
:math:`n`. We define the limit kernel as :math:`\lim_{n→∞} Θ_{\text{emp}}/n`, in which the first layer's
weights and all biases (``O(1)`` each) drop out:

.. math::
   Θ^1_{\text{std}} = 0, \qquad Θ^{l+1}_{\text{std}} = 𝔼[φ(u)φ(v)] + Θ^l_{\text{std}}\, \dot Σ^{l+1}.

neural-tangents' ``Dense(parameterization="standard")`` (Sohl-Dickstein et al. 2020) instead keeps the
widths: it takes widths :math:`s n_l`, :math:`s → ∞`, with the layers rescaled by :math:`1/\sqrt s`, so its
kernel holds the base widths :math:`n_l` (``out_dim``) as factors,
:math:`Θ^{l+1}_{\text{nt}} = n_l\, 𝔼[φφ] + Θ^l_{\text{nt}}\, \dot Σ^{l+1} + [\text{bias}]` from
:math:`Θ^1_{\text{nt}} = x·x' + [\text{bias}]` (:math:`[\text{bias}] = 1` when ``b_std`` is not ``None``).
With all :math:`n_l = n` it is affine in :math:`n`, :math:`Θ_{\text{nt}}(n) = n\,Θ_{\text{std}} + R`, where
:math:`R` holds the first layer's weights and the biases: ours is its slope, and the two agree up to
:math:`R/n`. Its NNGP is ours.

**Scale of the empirical kernel.** :func:`ntkcv.ntk_fn` *sums* over the :math:`K` traced outputs, so
:math:`Θ_{\text{emp}} → K\,Θ^{L+1}` in the ``"ntk"`` parameterisation and :math:`Θ_{\text{emp}}/(K n) →
Θ^{L+1}_{\text{std}}` in the standard one (hidden width :math:`n`); :func:`empirical_scale` returns that
factor. Fluctuations are :math:`O(n^{-1/2})` (Lee et al. 2019).

References: Jacot, Gabriel & Hongler, arXiv 1806.07572 (2018); Lee et al., arXiv 1902.06720 (2019); Arora et
al., arXiv 1904.11955 (2019); Cho & Saul, NeurIPS 2009 (arc-cosine kernels); Williams, NeurIPS 1997 (erf);
Sohl-Dickstein, Novak, Schoenholz & Lee, arXiv 2001.07301 (2020).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ntkcv.cv.drift import cosine_distance_of, relative_distance_of
from ntkcv.measurement import Context

__all__ = ["empirical_scale", "infinite_width_distance", "infinite_width_nngp", "infinite_width_ntk"]

Activation = str | Callable[[jax.Array], jax.Array]
KernelFn = Callable[..., jax.Array]
Dual = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
"""``(Σ₁₁, Σ₁₂, Σ₂₂) -> (𝔼[φ(u)φ(v)], 𝔼[φ'(u)φ'(v)])``, elementwise on broadcastable arrays."""

_PARAMETERIZATIONS = ("ntk", "standard")
_QUADRATURE_POINTS = 64  # Gauss–Hermite nodes per dimension
_QUADRATURE_BATCH = 256  # kernel entries integrated at once (memory: batch × points² values)


def _safe_divide(a: jax.Array, b: jax.Array, default: float) -> jax.Array:
    positive = b > 0
    return jnp.where(positive, a / jnp.where(positive, b, 1), default)


def _relu_dual(k11, k12, k22):
    norm = jnp.sqrt(k11 * k22)
    cos = jnp.clip(_safe_divide(k12, norm, 1.0), -1, 1)
    angle = jnp.arccos(cos)
    value = norm * (jnp.sqrt(1 - cos**2) + (jnp.pi - angle) * cos) / (2 * jnp.pi)
    return value, (jnp.pi - angle) / (2 * jnp.pi)


def _erf_dual(k11, k12, k22):
    product = (1 + 2 * k11) * (1 + 2 * k22)
    value = 2 / jnp.pi * jnp.arcsin(jnp.clip(2 * k12 / jnp.sqrt(product), -1, 1))
    return value, 4 / jnp.pi / jnp.sqrt(product - 4 * k12**2)


def _identity_dual(k11, k12, k22):
    return k12, jnp.ones_like(k12)


_CLOSED_FORMS: dict[str, Dual] = {"relu": _relu_dual, "erf": _erf_dual, "identity": _identity_dual,
                                  "linear": _identity_dual}
_BY_QUADRATURE: dict[str, Callable[[jax.Array], jax.Array]] = {
    "tanh": jnp.tanh, "gelu": jax.nn.gelu, "sigmoid": jax.nn.sigmoid}


def _quadrature_dual(phi: Callable[[jax.Array], jax.Array]) -> Dual:
    """Both expectations by a tensor Gauss–Hermite rule, :math:`u = \\sqrt{Σ_{11}} z_1`,
    :math:`v = (Σ_{12}/\\sqrt{Σ_{11}}) z_1 + \\sqrt{Σ_{22} - Σ_{12}^2/Σ_{11}}\\, z_2` for standard normal ``z``."""
    nodes, weights = np.polynomial.hermite.hermgauss(_QUADRATURE_POINTS)
    dphi = jnp.vectorize(jax.grad(phi))

    def entry(k):
        k11, k12, k22 = k
        k11, k22 = jnp.maximum(k11, k22), jnp.minimum(k11, k22)  # E is symmetric in (u, v): so is the rule
        z, w = jnp.asarray(np.sqrt(2) * nodes, k12.dtype), jnp.asarray(weights / np.sqrt(np.pi), k12.dtype)
        s1 = jnp.sqrt(k11)
        c = _safe_divide(k12, s1, 0.0)
        u = s1 * z
        v = c * z[:, None] + jnp.sqrt(jnp.maximum(k22 - c**2, 0)) * z[None, :]
        return w @ (phi(u)[:, None] * phi(v)) @ w, w @ (dphi(u)[:, None] * dphi(v)) @ w

    def dual(k11, k12, k22):
        k11, k12, k22 = jnp.broadcast_arrays(k11, k12, k22)
        size, batches = k12.size, max(1, -(-k12.size // _QUADRATURE_BATCH))
        batch = -(-size // batches)  # padded with ones (a valid covariance) to equal batches
        padded = tuple(jnp.pad(k.ravel(), (0, batches * batch - size), constant_values=1).reshape(batches, batch)
                       for k in (k11, k12, k22))
        value, derivative = jax.lax.map(jax.vmap(entry), padded)
        return value.ravel()[:size].reshape(k12.shape), derivative.ravel()[:size].reshape(k12.shape)

    return dual


def _dual(activation: Activation) -> Dual:
    if callable(activation):
        return _quadrature_dual(activation)
    if not isinstance(activation, str):
        raise TypeError(f"activation must be a name or a callable, got {type(activation).__name__}")
    if activation in _CLOSED_FORMS:
        return _CLOSED_FORMS[activation]
    if activation in _BY_QUADRATURE:
        return _quadrature_dual(_BY_QUADRATURE[activation])
    allowed = ", ".join(repr(name) for name in (*_CLOSED_FORMS, *_BY_QUADRATURE))
    raise ValueError(f"activation must be one of {allowed} or a callable, got {activation!r}")


def _expectations(dual: Dual, var1: jax.Array, cov: jax.Array, var2: jax.Array) -> tuple[jax.Array, ...]:
    """``dual`` on the ``(n₁, n₂)`` pairs and both diagonals in one call (one quadrature pass): the cross
    expectations and derivative expectations, then :math:`𝔼[φ(u)^2]` on each diagonal."""
    n1, n2 = cov.shape
    value, derivative = dual(jnp.concatenate([jnp.repeat(var1, n2), var1, var2]),
                             jnp.concatenate([cov.ravel(), var1, var2]),
                             jnp.concatenate([jnp.tile(var2, n1), var1, var2]))
    cross = slice(0, n1 * n2)
    return (value[cross].reshape(n1, n2), derivative[cross].reshape(n1, n2), value[n1 * n2:n1 * n2 + n1],
            value[n1 * n2 + n1:])


def _check_parameterization(parameterization: str) -> None:
    if parameterization not in _PARAMETERIZATIONS:
        raise ValueError(f"parameterization must be 'ntk' or 'standard', got {parameterization!r}")


def _as_features(x: jax.Array, name: str) -> jax.Array:
    x = jnp.asarray(x)
    if x.ndim < 2 or math.prod(x.shape[1:]) == 0:
        raise ValueError(f"{name} must be a batch of inputs (n, ...) with at least one feature, got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jax.dtypes.canonicalize_dtype(jnp.float64))
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))


def _kernel_fn(get: str, depth: int, activation: Activation, parameterization: str, weight_std: float,
               bias_std: float) -> KernelFn:
    """The shared recursion of :func:`infinite_width_nngp` (``get="nngp"``) and :func:`infinite_width_ntk`."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
        raise ValueError(f"depth (the number of hidden layers) must be an integer >= 0, got {depth!r}")
    _check_parameterization(parameterization)
    if parameterization == "standard" and depth == 0:
        raise ValueError("parameterization='standard' needs depth >= 1: its limit kernel is Θ_emp / (hidden width)")
    if not weight_std > 0:
        raise ValueError(f"weight_std must be > 0, got {weight_std!r}")
    if not bias_std >= 0:
        raise ValueError(f"bias_std must be >= 0, got {bias_std!r}")
    dual = _dual(activation)
    w2, b2 = weight_std**2, bias_std**2

    def kernel_fn(x1: jax.Array, x2: jax.Array | None = None) -> jax.Array:
        x1 = _as_features(x1, "x1")
        x2 = x1 if x2 is None else _as_features(x2, "x2")
        if x1.shape[1] != x2.shape[1]:
            raise ValueError(f"x1 and x2 must have as many features, got x1 {x1.shape} and x2 {x2.shape} flattened")
        dtype = jnp.promote_types(x1.dtype, x2.dtype)
        x1, x2 = x1.astype(dtype), x2.astype(dtype)
        highest = jax.lax.Precision.HIGHEST
        var1 = w2 * jnp.einsum("id,id->i", x1, x1, precision=highest) / x1.shape[1] + b2
        var2 = w2 * jnp.einsum("id,id->i", x2, x2, precision=highest) / x1.shape[1] + b2
        cov = w2 * jnp.matmul(x1, x2.T, precision=highest) / x1.shape[1] + b2
        ntk = cov if parameterization == "ntk" else jnp.zeros_like(cov)
        for _ in range(depth):
            expectation, derivative, diagonal1, diagonal2 = _expectations(dual, var1, cov, var2)
            var1, var2, cov = w2 * diagonal1 + b2, w2 * diagonal2 + b2, w2 * expectation + b2
            ntk = (cov if parameterization == "ntk" else expectation) + w2 * derivative * ntk
        return cov if get == "nngp" else ntk

    return jax.jit(kernel_fn)


def infinite_width_ntk(
    depth: int,
    activation: Activation,
    *,
    parameterization: str = "ntk",
    weight_std: float = 1.0,
    bias_std: float = 0.0,
) -> KernelFn:
    r"""Infinite-width NTK :math:`Θ^{L+1}` (or :math:`Θ^{L+1}_{\text{std}}`) of one output of a fully connected network.

    The recursions, closed forms and conventions are in the module docstring (:mod:`ntkcv.infinite`).

    Args:
      depth: number of hidden layers ``L >= 0`` (then a linear readout); ``0`` is a linear model (``"ntk"`` only).
      activation: ``"relu"``, ``"erf"``, ``"identity"``/``"linear"`` (closed forms), ``"tanh"``, ``"gelu"``,
        ``"sigmoid"`` or an elementwise callable (Gauss–Hermite quadrature).
      parameterization: ``"ntk"`` or ``"standard"`` (the limit of ``Θ_emp / width``).
      weight_std: :math:`σ_w > 0`.
      bias_std: :math:`σ_b ≥ 0`.

    Returns:
      ``kernel_fn(x1, x2=None)``, jitted, mapping inputs ``(n₁, ...)`` and ``(n₂, ...)`` (flattened to
      ``(n, d)``; ``x2=None`` means ``x1``) to the ``(n₁, n₂)`` kernel. Compare it with
      ``ntk_fn(apply_fn)(params, x) / empirical_scale(...)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from ntkcv.infinite import infinite_width_ntk
      >>> kernel_fn = infinite_width_ntk(2, "relu", bias_std=0.1)
      >>> kernel_fn(jnp.ones((4, 3)), jnp.zeros((2, 3))).shape
      (4, 2)

    References:
      Jacot et al., arXiv 1806.07572; Arora et al., arXiv 1904.11955.
    """
    return _kernel_fn("ntk", depth, activation, parameterization, weight_std, bias_std)


def infinite_width_nngp(
    depth: int,
    activation: Activation,
    *,
    parameterization: str = "ntk",
    weight_std: float = 1.0,
    bias_std: float = 0.0,
) -> KernelFn:
    """Infinite-width NNGP kernel :math:`Σ^{L+1}`: the covariance of one output at initialisation.

    The same in both parameterisations (``parameterization`` is checked, and ``"standard"`` needs ``depth >= 1``,
    as for :func:`infinite_width_ntk`, whose arguments and return value it shares).

    Example:
      >>> import jax.numpy as jnp
      >>> from ntkcv.infinite import infinite_width_nngp
      >>> float(infinite_width_nngp(0, "relu", weight_std=2.0)(jnp.ones((1, 4)))[0, 0])
      4.0

    References:
      Neal, "Bayesian learning for neural networks" (1996); Lee et al., arXiv 1711.00165 (2018).
    """
    return _kernel_fn("nngp", depth, activation, parameterization, weight_std, bias_std)


def empirical_scale(parameterization: str, *, num_outputs: int, width: int) -> float:
    """The factor between :func:`ntkcv.ntk_fn`'s empirical kernel and :func:`infinite_width_ntk`'s.

    ``ntk_fn`` sums over the ``K = num_outputs`` traced outputs, and in the standard parameterisation the
    kernel grows with the hidden ``width`` ``n``: ``Θ_emp / empirical_scale(...) → Θ_∞`` with the factor ``K``
    (``"ntk"``) or ``K·n`` (``"standard"``).

    Args:
      parameterization: ``"ntk"`` or ``"standard"``.
      num_outputs: ``K >= 1``, the number of traced outputs.
      width: ``n >= 1``, the width of every hidden layer (unused for ``"ntk"``).

    Returns:
      ``K`` or ``K·n``, as a float.

    Example:
      >>> from ntkcv.infinite import empirical_scale
      >>> empirical_scale("standard", num_outputs=10, width=512)
      5120.0
    """
    _check_parameterization(parameterization)
    for name, value in (("num_outputs", num_outputs), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return float(num_outputs * (width if parameterization == "standard" else 1))


def infinite_width_distance(kernel_fn: Callable[..., jax.Array], *, scale: float) -> Callable[[Context], dict]:
    r"""A monitor measurement (a function of a :class:`ntkcv.Context`, for ``cvs``) of how far a probe set's empirical
    kernel is from the infinite-width one: with :math:`\hat Θ = Θ_{\text{emp}}/\text{scale}` and
    :math:`Θ_∞` = ``kernel_fn(inputs)``,

    .. math::
       \texttt{infinite\_width/relative\_distance} = \frac{\|\hat Θ - Θ_∞\|_F}{\|Θ_∞\|_F}, \qquad
       \texttt{infinite\_width/cosine\_distance} = 1 - \frac{⟨\hat Θ, Θ_∞⟩_F}{\|\hat Θ\|_F \|Θ_∞\|_F}

    (:func:`ntkcv.cv.relative_distance`, :func:`ntkcv.cv.cosine_distance`; the cosine distance is free of the
    scale). At initialisation both are :math:`O(n^{-1/2})` for hidden width :math:`n`; as the network learns
    features, its kernel moves away from :math:`Θ_∞`, which stays fixed.

    Args:
      kernel_fn: from :func:`infinite_width_ntk`, for the monitored network's depth, activation, parameterisation
        and weight and bias scales.
      scale: :func:`empirical_scale` of the network: ``K`` (``"ntk"``) or ``K·n`` (``"standard"``). Needs the
        monitor's output-traced kernel (``trace_axes=(-1,)``).
    """

    def infinite_width(context: Context) -> dict[str, jax.Array]:
        reference = kernel_fn(context.inputs)
        if context.kernel.shape != reference.shape:
            raise ValueError(f"infinite_width_distance needs the output-traced kernel of the probes, "
                             f"{reference.shape}; got a kernel of shape {context.kernel.shape} (trace_axes=())")
        kernel = context.kernel / scale
        reference = reference.astype(kernel.dtype)
        return {"infinite_width/relative_distance": relative_distance_of(reference, kernel),
                "infinite_width/cosine_distance": cosine_distance_of(reference, kernel)}

    return infinite_width
