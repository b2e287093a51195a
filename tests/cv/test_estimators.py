import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntkcv.cv as cv
from tests.cv.matrices import mlp_jacobian, psd_from_spectrum


def exact(eigenvalues):
    lam = np.sort(np.clip(eigenvalues, 0, None))[::-1]
    p = lam[lam > 0] / lam.sum()
    return {"trace": lam.sum(), "entropy": -np.sum(p * np.log(p)), "top": lam}


@pytest.fixture(scope="module")
def dense():
    """n = 400 with a known, slowly decaying spectrum."""
    matrix = psd_from_spectrum(1.0 + np.exp(-np.arange(400) / 40.0), seed=0)
    return (lambda a, v: a @ v), jnp.asarray(matrix), exact(np.linalg.eigvalsh(matrix))


@pytest.fixture(scope="module")
def ntk():
    """A real NTK J Jᵀ of a tanh MLP, 200 inputs × 10 outputs (n = 2000), applied without forming it."""
    jacobian = mlp_jacobian()
    # eig(J Jᵀ) = eig(JᵀJ) and n - P zeros, which change neither trace, entropy nor the top eigenvalues
    return (
        (lambda j, v: j @ (j.T @ v)),
        jacobian,
        exact(np.linalg.eigvalsh(np.asarray(jacobian.T @ jacobian))),
    )


def run(estimator, operator, **budget):
    """Jit ``estimator`` with the operand as an argument (closed-over arrays would become constants)."""
    apply, operand, _ = operator
    n = operand.shape[0]
    fn = jax.jit(lambda key, a: estimator(lambda v: apply(a, v), key, n=n, dtype=jnp.float64, **budget))
    return fn(jax.random.PRNGKey(1), operand)


def check(estimate, truth, rtol=0.01):
    value, stderr = np.asarray(estimate.value), np.asarray(estimate.stderr)
    assert np.all(np.abs(value - truth) <= 3 * stderr), (value, truth, stderr)
    np.testing.assert_allclose(value, truth, rtol=rtol)


@pytest.mark.parametrize("operator", ["dense", "ntk"])
def test_trace_estimators(operator, request):
    operator = request.getfixturevalue(operator)
    truth = operator[2]["trace"]
    probes = 100 if operator[1].shape[0] == 400 else 1500
    check(run(cv.trace_hutchinson, operator, num_probes=probes), truth)
    check(run(cv.trace_hutchpp, operator, num_matvecs=300), truth)


@pytest.mark.parametrize("operator", ["dense", "ntk"])
def test_entropy_slq(operator, request):
    operator = request.getfixturevalue(operator)
    check(run(cv.entropy_slq, operator, num_probes=30, num_matvecs=30), operator[2]["entropy"])


def test_top_eigenvalues_lanczos(ntk):
    check(run(cv.top_eigenvalues_lanczos, ntk, k=5, num_matvecs=80), ntk[2]["top"][:5], rtol=1e-6)


def test_budget_errors():
    with pytest.raises(ValueError, match="got 50"):
        cv.entropy_slq(lambda v: v, jax.random.PRNGKey(0), n=10, num_probes=4, num_matvecs=50)
    with pytest.raises(ValueError, match="k=6"):
        cv.top_eigenvalues_lanczos(lambda v: v, jax.random.PRNGKey(0), n=10, k=6, num_matvecs=5)
    with pytest.raises(ValueError, match="got 2"):
        cv.trace_hutchpp(lambda v: v, jax.random.PRNGKey(0), n=10, num_matvecs=2)
