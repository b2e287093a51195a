"""Loss curvature against dense references in float64: ``jax.hessian`` of the raveled loss, ``Jᵀ H J / n`` from
``jax.jacrev``, ``numpy.linalg.eigvalsh``, and optax's losses."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from ntkcv import curvature

N, D, WIDTH, K = 40, 3, 5, 3  # P = 38 parameters, n·K = 120


@pytest.fixture(autouse=True)
def _float64():
    with jax.enable_x64(True):
        yield


def apply_fn(params, x):
    return jnp.tanh(x @ params["w"] + params["b"][None]) @ params["v"] + params["c"][None]


@pytest.fixture
def problem():
    keys = jax.random.split(jax.random.key(0), 4)
    params = {"w": jax.random.normal(keys[0], (D, WIDTH)) / np.sqrt(D), "b": 0.1 * jnp.ones(WIDTH),
              "v": jax.random.normal(keys[1], (WIDTH, K)), "c": jnp.zeros(K)}
    x = jax.random.normal(keys[2], (N, D))
    labels = jax.random.randint(keys[3], (N,), 0, K)
    return params, x, labels


def dense_hessian(loss_fn, params):
    flat, unravel = ravel_pytree(params)
    return np.asarray(jax.hessian(lambda w: loss_fn(unravel(w)))(flat))


def dense_ggn(params, x, loss):
    """``Jᵀ H J / n`` with the Jacobian from ``jax.jacrev`` and ``H`` the per-sample Hessian of the loss in the
    outputs: ``I`` (MSE) or ``diag(p) − ppᵀ`` (cross-entropy)."""
    flat, unravel = ravel_pytree(params)
    jacobian = np.asarray(jax.jacrev(lambda w: apply_fn(unravel(w), x))(flat)).reshape(N * K, -1)
    if loss == "mse":
        hessian = np.eye(N * K)
    else:
        p = np.asarray(jax.nn.softmax(apply_fn(params, x)))
        hessian = np.zeros((N * K, N * K))
        for i, pi in enumerate(p):
            hessian[i * K:(i + 1) * K, i * K:(i + 1) * K] = np.diag(pi) - np.outer(pi, pi)
    return jacobian.T @ hessian @ jacobian / N


def assert_within_bound(estimate, truth, *, factor=1.0, floor=1e-10):
    value, stderr = np.asarray(estimate.value), np.asarray(estimate.stderr)
    assert np.all(np.abs(value - truth) <= factor * stderr + floor), (value, truth, stderr)


def test_losses_match_optax(problem):
    params, x, labels = problem
    logits = apply_fn(params, x)
    one_hot = jax.nn.one_hot(labels, K)
    targets = jax.random.normal(jax.random.key(5), (N, K))
    np.testing.assert_allclose(curvature.cross_entropy(logits, labels),
                               optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), rtol=1e-12)
    np.testing.assert_allclose(curvature.cross_entropy(logits, one_hot), curvature.cross_entropy(logits, labels),
                               rtol=1e-12)
    soft = jax.nn.softmax(targets)
    np.testing.assert_allclose(curvature.cross_entropy(logits, soft), optax.softmax_cross_entropy(logits, soft).mean(),
                               rtol=1e-12)
    np.testing.assert_allclose(curvature.mse(logits, targets), 0.5 * np.mean(np.sum((logits - targets) ** 2, -1)),
                               rtol=1e-12)
    np.testing.assert_allclose(curvature.mse(logits, labels), curvature.mse(logits, one_hot), rtol=1e-12)
    loss_fn = curvature.make_loss_fn(apply_fn, x, labels, loss="cross_entropy")
    np.testing.assert_allclose(loss_fn(params), curvature.cross_entropy(logits, labels), rtol=1e-12)


@pytest.mark.parametrize("loss", curvature.LOSSES)
def test_hessian_matches_dense_hessian(problem, loss):
    params, x, labels = problem
    loss_fn = curvature.make_loss_fn(apply_fn, x, labels, loss=loss)
    eigenvalues = np.linalg.eigvalsh(dense_hessian(loss_fn, params))[::-1]
    top, trace = jax.jit(lambda p, key: (
        curvature.hessian_top_eigenvalues(loss_fn, p, key, k=2, num_matvecs=20),
        curvature.hessian_trace(loss_fn, p, key, num_matvecs=45)))(params, jax.random.key(1))
    assert top.value.shape == top.stderr.shape == (2,)
    assert_within_bound(top, eigenvalues[:2])  # Lanczos: a deterministic residual bound
    np.testing.assert_allclose(top.value[0], eigenvalues[0], rtol=1e-6)
    assert top.stderr[0] < 1e-4 * abs(eigenvalues[0])
    assert_within_bound(trace, eigenvalues.sum(), factor=4.0)  # Hutch++: a standard error
    assert float(trace.stderr) > 0


@pytest.mark.parametrize("loss", curvature.LOSSES)
def test_ggn_matches_dense_gauss_newton(problem, loss):
    params, x, _ = problem
    eigenvalues = np.linalg.eigvalsh(dense_ggn(params, x, loss))[::-1]

    @jax.jit
    def estimates(p, x, key):
        # chunks of 16 of the 40 samples: the matrix-free operator and the softmax run in padded passes
        return {mode: (curvature.ggn_top_eigenvalues(apply_fn, p, x, loss=loss, key=key, k=3, matrix_free=mode,
                                                     num_matvecs=20, chunk_size=16),
                       curvature.ggn_trace(apply_fn, p, x, loss=loss, key=key, matrix_free=mode, num_matvecs=30,
                                           chunk_size=16))
                for mode in (False, True)}

    results = estimates(params, x, jax.random.key(2))
    exact_top, exact_trace = results[False]
    np.testing.assert_allclose(exact_top.value, eigenvalues[:3], rtol=1e-10)
    np.testing.assert_allclose(exact_trace.value, eigenvalues.sum(), rtol=1e-10)
    assert np.all(exact_top.stderr == 0) and exact_trace.stderr == 0
    free_top, free_trace = results[True]
    assert_within_bound(free_top, eigenvalues[:3])
    np.testing.assert_allclose(free_top.value[0], eigenvalues[0], rtol=1e-6)
    assert_within_bound(free_trace, eigenvalues.sum(), factor=4.0)
    assert float(free_trace.stderr) > 0


def test_hessian_equals_gauss_newton_at_zero_residual(problem):
    """For MSE, ∇²L = G + (1/n) Σ rᵢ·∇²fᵢ: with targets equal to the outputs the residuals r vanish and ∇²L = G."""
    params, x, _ = problem
    outputs = apply_fn(params, x)
    hessian = np.linalg.eigvalsh(dense_hessian(curvature.make_loss_fn(apply_fn, x, outputs, loss="mse"), params))
    top, trace = jax.jit(lambda p, x: (
        curvature.ggn_top_eigenvalues(apply_fn, p, x, loss="mse", key=jax.random.key(0), k=4, matrix_free=False),
        curvature.ggn_trace(apply_fn, p, x, loss="mse", key=jax.random.key(0), matrix_free=False)))(params, x)
    np.testing.assert_allclose(top.value, hessian[::-1][:4], rtol=1e-10)
    np.testing.assert_allclose(trace.value, hessian.sum(), rtol=1e-10)
    # away from it they differ: the residual term is not negligible here
    noisy = np.linalg.eigvalsh(dense_hessian(curvature.make_loss_fn(apply_fn, x, outputs + 1.0, loss="mse"), params))
    assert not np.isclose(noisy[-1], hessian[-1], rtol=1e-3)


def test_auto_decides_from_shapes(problem):
    params, x, _ = problem
    tiny, large = x[:4], jnp.zeros((5000, D))
    assert not curvature.prefer_matrix_free_ggn(apply_fn, params, tiny, estimate="top_eigenvalues", num_matvecs=30)
    assert curvature.prefer_matrix_free_ggn(apply_fn, params, large, estimate="top_eigenvalues", num_matvecs=30)
    # the exact trace costs n·K backward passes, the estimate num_matvecs products of ≈ 4n/3 of them each
    many_outputs = lambda p, x: jnp.tile(apply_fn(p, x), (1, 20))  # noqa: E731  K = 60
    assert not curvature.prefer_matrix_free_ggn(apply_fn, params, large, estimate="trace", num_matvecs=30)
    assert curvature.prefer_matrix_free_ggn(many_outputs, params, tiny, estimate="trace", num_matvecs=30)
    assert not curvature.prefer_matrix_free_ggn(many_outputs, params, tiny, estimate="trace", num_matvecs=60)


def test_jit_with_params_and_inputs_as_arguments(problem):
    params, x, _ = problem
    sharpness_fn = jax.jit(lambda p, x: curvature.ggn_top_eigenvalues(apply_fn, p, x, loss="mse",
                                                                      key=jax.random.key(0)))
    sharpness = sharpness_fn(params, x)
    assert sharpness.value.shape == (1,)
    np.testing.assert_allclose(sharpness.value, np.linalg.eigvalsh(dense_ggn(params, x, "mse"))[-1:], rtol=1e-10)
    shifted = jax.tree_util.tree_map(lambda a: a * 1.1, params)
    np.testing.assert_allclose(sharpness_fn(shifted, x).value,  # params are arguments, not constants
                               np.linalg.eigvalsh(dense_ggn(shifted, x, "mse"))[-1:], rtol=1e-10)


def test_errors_name_the_problem(problem):
    params, x, labels = problem
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="loss must be one of 'mse', 'cross_entropy'; got 'hinge'"):
        curvature.ggn_top_eigenvalues(apply_fn, params, x, loss="hinge", key=key)
    with pytest.raises(ValueError, match="loss must be one of"):
        curvature.make_loss_fn(apply_fn, x, labels, loss="xent")
    with pytest.raises(ValueError, match=r"outputs \(n, K\) with n = 40; got shape \(40, 3, 1\)"):
        curvature.ggn_trace(lambda p, x: apply_fn(p, x)[..., None], params, x, loss="mse", key=key)
    with pytest.raises(ValueError, match=r"integer labels must have shape \(n,\) = \(40,\)"):
        curvature.mse(apply_fn(params, x), labels[:10])
    with pytest.raises(ValueError, match=r"targets must be integer labels \(n,\) or real targets"):
        curvature.cross_entropy(apply_fn(params, x), jnp.ones((N, K + 1)))
    with pytest.raises(ValueError, match=r"outputs must have shape \(n, K\)"):
        curvature.mse(jnp.ones(N), jnp.ones(N))
    with pytest.raises(ValueError, match="k must be an integer with 1 <= k <= 120"):
        curvature.ggn_top_eigenvalues(apply_fn, params, x, loss="mse", key=key, k=121)
    with pytest.raises(ValueError, match="matrix_free must be True, False or 'auto'; got 'yes'"):
        curvature.ggn_trace(apply_fn, params, x, loss="mse", key=key, matrix_free="yes")
    with pytest.raises(ValueError, match=r"loss_fn must return a scalar, got \(40, 3\)"):
        curvature.hessian_trace(lambda p: apply_fn(p, x), params, key)
    with pytest.raises(ValueError, match="estimate must be 'top_eigenvalues' or 'trace'"):
        curvature.prefer_matrix_free_ggn(apply_fn, params, x, estimate="spectrum", num_matvecs=30)
