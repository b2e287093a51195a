"""ntkcv.predict against independent references: numerical integration of the linearised ODE (scipy's
``solve_ivp``), linear solves and pseudo-inverses (numpy), and a wide network trained by gradient descent."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.integrate import solve_ivp

import ntkcv
from ntkcv.predict import gradient_descent_mse, kernel_regression
from tests.cv.matrices import psd_from_spectrum


@pytest.fixture(autouse=True, scope="module")
def _float64():
    """The references are float64, so the module runs with ``jax_enable_x64`` (restored afterwards)."""
    with jax.enable_x64(True):
        yield


def gram_kernels(seed, num_train, num_test, num_outputs, num_features):
    """Full kernels ``Θ[i, j, a, b] = ⟨φ_a(x_i), φ_b(x_j)⟩`` of random features (PSD, outputs coupled), train and
    test–train; singular when ``num_features < num_train·num_outputs``."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(num_train + num_test, num_outputs, num_features)) / np.sqrt(num_features)
    kernel = np.einsum("iap,jbp->ijab", features, features)
    return kernel[:num_train, :num_train], kernel[num_train:, :num_train]


def problem(seed, num_train, num_test, num_outputs):
    """Targets and initial outputs on train and test points."""
    rng = np.random.default_rng(seed + 1000)
    return (rng.normal(size=(num_train, num_outputs)), rng.normal(size=(num_train, num_outputs)),
            rng.normal(size=(num_test, num_outputs)))


def flat(kernel):
    return np.asarray(ntkcv.flatten_kernel(jnp.asarray(kernel)))


def integrate(matrix_train, matrix_test, targets, outputs_train_0, outputs_test_0, learning_rate, times):
    """``df_tr/dt = -(η/n) A (f_tr - y)``, ``df_te/dt = -(η/n) B (f_tr - y)`` on outputs flattened as
    ``(sample, output)``, integrated at ``rtol=1e-10``; returns ``(T, n, K)`` and ``(T, n_test, K)``."""
    n, size = targets.shape[0], targets.size
    rate = learning_rate / n

    def rhs(_, state):
        residual = state[:size] - targets.ravel()
        return -rate * np.concatenate([matrix_train @ residual, matrix_test @ residual])

    start = np.concatenate([outputs_train_0.ravel(), outputs_test_0.ravel()])
    solution = solve_ivp(rhs, (0.0, max(times)), start, method="DOP853", t_eval=times, rtol=1e-10, atol=1e-12)
    assert solution.success, solution.message
    states = solution.y.T
    return (states[:, :size].reshape(len(times), *targets.shape),
            states[:, size:].reshape(len(times), *outputs_test_0.shape))


TIMES = [0.0, 0.5, 3.0, 20.0, 60.0]


def test_full_kernel_matches_ode():
    kernel_train, kernel_test = gram_kernels(0, 6, 3, 2, 30)
    targets, f_train_0, f_test_0 = problem(0, 6, 3, 2)
    predict_fn = gradient_descent_mse(kernel_train, targets, learning_rate=0.7)
    f_train, f_test = predict_fn(jnp.array(TIMES), f_train_0, f_test_0, kernel_test)
    ref_train, ref_test = integrate(flat(kernel_train), flat(kernel_test), targets, f_train_0, f_test_0, 0.7, TIMES)
    assert f_train.shape == (5, 6, 2) and f_test.shape == (5, 3, 2)
    np.testing.assert_allclose(f_train, ref_train, rtol=0, atol=1e-8)
    np.testing.assert_allclose(f_test, ref_test, rtol=0, atol=1e-8)
    assert np.abs(ref_train[-1] - f_train_0).max() > 0.5  # the outputs moved: the comparison is not vacuous
    # a scalar time gives one slice of the vectorised result; t = 0 gives the initial outputs exactly
    one_train, one_test = predict_fn(3.0, f_train_0, f_test_0, kernel_test)
    np.testing.assert_allclose(one_train, f_train[2], rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(one_test, f_test[2], rtol=1e-13, atol=1e-13)
    np.testing.assert_array_equal(f_train[0], f_train_0)
    np.testing.assert_array_equal(f_test[0], f_test_0)
    assert predict_fn(1.0, f_train_0)[1] is None


def test_traced_kernel_is_mean_diagonal_block():
    """``Θ_full = Θ₁ ⊗ I_K`` has the traced kernel ``K·Θ₁``: both paths give the ODE's solution."""
    num_outputs = 3
    kernel_1, kernel_1_test = (k[:, :, 0, 0] for k in gram_kernels(1, 5, 4, 1, 20))
    eye = np.eye(num_outputs)
    full_train, full_test = kernel_1[:, :, None, None] * eye, kernel_1_test[:, :, None, None] * eye
    traced_train, traced_test = np.einsum("ijkk->ij", full_train), np.einsum("ijkk->ij", full_test)
    np.testing.assert_allclose(traced_train, num_outputs * kernel_1, rtol=1e-14)
    targets, f_train_0, f_test_0 = problem(1, 5, 4, num_outputs)
    times = jnp.array(TIMES)
    full = gradient_descent_mse(full_train, targets, learning_rate=1.3)(times, f_train_0, f_test_0, full_test)
    traced = gradient_descent_mse(traced_train, targets, learning_rate=1.3)(times, f_train_0, f_test_0, traced_test)
    reference = integrate(flat(full_train), flat(full_test), targets, f_train_0, f_test_0, 1.3, TIMES)
    for ours, theirs, ref in zip(full, traced, reference, strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12)
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-8)


@pytest.mark.parametrize("traced", [False, True])
def test_infinite_time_is_kernel_regression(traced):
    kernel_train, kernel_test = gram_kernels(2, 6, 3, 2, 30)
    if traced:  # a traced kernel means Θ/K ⊗ I: the same regression for every output
        kernel_train, kernel_test = np.einsum("ijkk->ij", kernel_train), np.einsum("ijkk->ij", kernel_test)
        matrix_train, matrix_test = np.kron(kernel_train / 2, np.eye(2)), np.kron(kernel_test / 2, np.eye(2))
    else:
        matrix_train, matrix_test = flat(kernel_train), flat(kernel_test)
    targets, f_train_0, f_test_0 = problem(2, 6, 3, 2)
    predict_fn = gradient_descent_mse(kernel_train, targets, learning_rate=0.5)
    correction = matrix_test @ np.linalg.solve(matrix_train, (targets - f_train_0).ravel())
    expected_test = f_test_0 + correction.reshape(3, 2)
    for t in (None, jnp.inf, 1e9):
        f_train, f_test = predict_fn(t, f_train_0, f_test_0, kernel_test)
        np.testing.assert_allclose(f_train, targets, rtol=0, atol=1e-10)  # interpolation: Θ is nonsingular
        np.testing.assert_allclose(f_test, expected_test, rtol=1e-9, atol=1e-9)
    regression = kernel_regression(kernel_train, targets, kernel_test)
    expected = (matrix_test @ np.linalg.solve(matrix_train, targets.ravel())).reshape(3, 2)
    np.testing.assert_allclose(regression, expected, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(kernel_regression(kernel_train, targets, kernel_train), targets, atol=1e-10)


def test_singular_kernel_without_ridge_stays_finite():
    kernel_train, kernel_test = gram_kernels(3, 6, 3, 2, 4)  # rank 4 < n·K = 12: eigenvalues 0 ± round-off
    targets, f_train_0, f_test_0 = problem(3, 6, 3, 2)
    matrix_train, matrix_test = flat(kernel_train), flat(kernel_test)
    assert np.linalg.eigvalsh(matrix_train).min() < 1e-14
    predict_fn = gradient_descent_mse(kernel_train, targets, learning_rate=0.7)
    f_train, f_test = predict_fn(jnp.array(TIMES), f_train_0, f_test_0, kernel_test)
    ref_train, ref_test = integrate(matrix_train, matrix_test, targets, f_train_0, f_test_0, 0.7, TIMES)
    np.testing.assert_allclose(f_train, ref_train, rtol=0, atol=1e-8)
    np.testing.assert_allclose(f_test, ref_test, rtol=0, atol=1e-8)
    # t → ∞: the null space of Θ is never fitted (pseudo-inverse)
    f_train, f_test = predict_fn(None, f_train_0, f_test_0, kernel_test)
    residual = (f_train_0 - targets).ravel()
    pinv = np.linalg.pinv(matrix_train, rcond=1e-10)
    np.testing.assert_allclose(f_train.ravel(), f_train_0.ravel() - matrix_train @ pinv @ residual, atol=1e-10)
    np.testing.assert_allclose(f_test.ravel(), f_test_0.ravel() - matrix_test @ pinv @ residual, atol=1e-9)


def test_zero_and_negative_eigenvalues():
    """An exactly zero kernel leaves the outputs where they are; a round-off negative eigenvalue counts as 0."""
    targets, f_train_0, f_test_0 = problem(4, 4, 2, 1)
    for t in (0.0, 5.0, None):
        f_train, f_test = gradient_descent_mse(np.zeros((4, 4)), targets)(t, f_train_0, f_test_0, np.zeros((2, 4)))
        np.testing.assert_array_equal(f_train, f_train_0)
        np.testing.assert_array_equal(f_test, f_test_0)
    spectrum = np.array([2.0, 0.5, 0.0, -1e-15])
    kernel = psd_from_spectrum(spectrum, seed=4)
    kernel_test = np.random.default_rng(4).normal(size=(2, 4))
    f_train, f_test = gradient_descent_mse(kernel, targets, learning_rate=4.0)(7.0, f_train_0, f_test_0, kernel_test)
    ref_train, ref_test = integrate(kernel, kernel_test, targets, f_train_0, f_test_0, 4.0, [7.0])
    np.testing.assert_allclose(f_train, ref_train[0], atol=1e-9)
    np.testing.assert_allclose(f_test, ref_test[0], atol=1e-9)


@pytest.mark.parametrize("traced", [False, True])
def test_ridge_matches_regularised_ode(traced):
    kernel_train, kernel_test = gram_kernels(5, 6, 3, 2, 4)  # singular
    if traced:
        kernel_train, kernel_test = np.einsum("ijkk->ij", kernel_train), np.einsum("ijkk->ij", kernel_test)
        matrix_train, matrix_test = np.kron(kernel_train / 2, np.eye(2)), np.kron(kernel_test / 2, np.eye(2))
    else:
        matrix_train, matrix_test = flat(kernel_train), flat(kernel_test)
    targets, f_train_0, f_test_0 = problem(5, 6, 3, 2)
    ridge = 0.1
    regularised = matrix_train + ridge * np.trace(matrix_train) / 12 * np.eye(12)  # relative to the mean eigenvalue
    predict_fn = gradient_descent_mse(kernel_train, targets, learning_rate=0.7, ridge=ridge)
    f_train, f_test = predict_fn(jnp.array(TIMES), f_train_0, f_test_0, kernel_test)
    ref_train, ref_test = integrate(regularised, matrix_test, targets, f_train_0, f_test_0, 0.7, TIMES)
    np.testing.assert_allclose(f_train, ref_train, rtol=0, atol=1e-8)
    np.testing.assert_allclose(f_test, ref_test, rtol=0, atol=1e-8)
    expected = (matrix_test @ np.linalg.solve(regularised, targets.ravel())).reshape(3, 2)
    np.testing.assert_allclose(kernel_regression(kernel_train, targets, kernel_test, ridge=ridge), expected,
                               rtol=1e-9, atol=1e-9)


@pytest.fixture(scope="module")
def wide_network():
    """A one-hidden-layer NTK-parameterised tanh network of width 2048 (K = 2 outputs), trained by plain gradient
    descent on ``0.5·mean_i Σ_k (f - y)²``; its empirical NTK at initialisation, full and traced."""
    width, dim, num_outputs, num_train, num_test, steps = 2048, 2, 2, 8, 5, 200
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    params = {"w": jax.random.normal(keys[0], (dim, width)), "b": jax.random.normal(keys[1], (width,)),
              "v": jax.random.normal(keys[2], (width, num_outputs))}

    def apply_fn(p, x):
        return jnp.tanh(x @ p["w"] / np.sqrt(dim) + p["b"][None]) @ p["v"] / np.sqrt(width)

    x = jax.random.normal(keys[3], (num_train + num_test, dim))
    x_train, x_test = x[:num_train], x[num_train:]
    targets = jax.random.normal(keys[4], (num_train, num_outputs))
    full_fn, traced_fn = ntkcv.ntk_fn(apply_fn, trace_axes=()), ntkcv.ntk_fn(apply_fn)
    kernels = {"full": (full_fn(params, x_train), full_fn(params, x_test, x_train)),
               "traced": (traced_fn(params, x_train), traced_fn(params, x_test, x_train))}
    # steps small against the fastest mode (η λ_max / n = 0.05), long enough to fit it (τ λ_max = 10)
    learning_rate = 0.05 * num_train / np.linalg.eigvalsh(flat(kernels["full"][0])).max()

    def loss(p):
        return 0.5 * jnp.mean(jnp.sum((apply_fn(p, x_train) - targets) ** 2, axis=-1))

    @jax.jit
    def train(p):
        def step(_, p):
            return jax.tree.map(lambda a, g: a - learning_rate * g, p, jax.grad(loss)(p))

        return jax.lax.fori_loop(0, steps, step, p)

    trained = train(params)
    outputs_0 = apply_fn(params, x_train), apply_fn(params, x_test)
    outputs_t = apply_fn(trained, x_train), apply_fn(trained, x_test)
    return kernels, targets, learning_rate, steps, outputs_0, outputs_t


@pytest.mark.parametrize(("kind", "tolerance"), [("full", 0.01), ("traced", 0.03)])
def test_wide_network_follows_its_linearisation(wide_network, kind, tolerance):
    kernels, targets, learning_rate, steps, (f_train_0, f_test_0), (f_train_t, f_test_t) = wide_network
    kernel_train, kernel_test = kernels[kind]
    predict_fn = gradient_descent_mse(kernel_train, targets, learning_rate=learning_rate)
    predicted_train, predicted_test = predict_fn(steps, f_train_0, f_test_0, kernel_test)
    for predicted, trained, initial in ((predicted_train, f_train_t, f_train_0), (predicted_test, f_test_t, f_test_0)):
        change = np.linalg.norm(trained - initial)
        assert change > 0.1 * np.linalg.norm(initial)  # the network did train
        assert np.linalg.norm(predicted - trained) < tolerance * change


spectra = st.sampled_from([3, 5]).flatmap(lambda n: st.lists(st.floats(0.0, 10.0), min_size=n, max_size=n))


@settings(max_examples=25, deadline=None)
@given(spectra, st.integers(0, 1000), st.lists(st.floats(0.0, 1e3), min_size=4, max_size=4), st.booleans())
def test_training_loss_never_increases(spectrum, seed, times, traced):
    num_train, num_outputs = len(spectrum), 2
    kernel = psd_from_spectrum(spectrum, seed)
    if not traced:  # couple the outputs: Θ_full = Θ ⊗ C with C positive definite
        coupling = np.array([[1.0, 0.3], [0.3, 0.5]])
        kernel = kernel[:, :, None, None] * coupling
    targets, f_train_0, f_test_0 = problem(seed, num_train, 2, num_outputs)
    kernel_test = np.random.default_rng(seed).normal(size=(2, *kernel.shape[1:]))
    times = np.sort(np.array(times))
    f_train, f_test = gradient_descent_mse(kernel, targets, learning_rate=0.9)(
        jnp.array([0.0, *times]), f_train_0, f_test_0, kernel_test)
    np.testing.assert_array_equal(f_train[0], f_train_0)
    np.testing.assert_array_equal(f_test[0], f_test_0)
    losses = 0.5 * np.mean(np.sum((np.asarray(f_train) - targets) ** 2, axis=-1), axis=-1)
    assert np.all(np.diff(losses) <= 1e-12 * losses[0] + 1e-14), losses


def test_jit():
    kernel_train, kernel_test = gram_kernels(6, 6, 3, 2, 30)
    targets, f_train_0, f_test_0 = problem(6, 6, 3, 2)
    predict_fn = gradient_descent_mse(kernel_train, targets, learning_rate=0.7)
    jitted = jax.jit(chex.assert_max_traces(predict_fn, n=1))
    for t in (0.5, 3.0, 20.0):  # new times, no new trace
        for ours, eager in zip(jitted(t, f_train_0, f_test_0, kernel_test),
                               predict_fn(t, f_train_0, f_test_0, kernel_test), strict=True):
            np.testing.assert_allclose(ours, eager, rtol=1e-12, atol=1e-12)
    limit = jax.jit(lambda f0, g0, k: predict_fn(None, f0, g0, k))(f_train_0, f_test_0, kernel_test)
    np.testing.assert_allclose(limit[0], targets, atol=1e-10)

    @jax.jit
    def factory_inside(kernel, y, f0, t, learning_rate, ridge):  # the factory traces too (η, r unchecked there)
        return gradient_descent_mse(kernel, y, learning_rate=learning_rate, ridge=ridge)(t, f0)[0]

    eager = gradient_descent_mse(kernel_train, targets, learning_rate=0.7, ridge=0.01)(3.0, f_train_0)[0]
    np.testing.assert_allclose(factory_inside(kernel_train, targets, f_train_0, 3.0, 0.7, 0.01), eager, atol=1e-12)


def test_float32_follows_the_input_dtype():
    kernel_train, kernel_test = gram_kernels(7, 6, 3, 2, 30)
    targets, f_train_0, f_test_0 = problem(7, 6, 3, 2)
    single = [np.asarray(a, np.float32) for a in (kernel_train, targets, f_train_0, f_test_0, kernel_test)]
    ours = gradient_descent_mse(*single[:2], learning_rate=0.7)(jnp.float32(20.0), *single[2:])
    double = gradient_descent_mse(kernel_train, targets, learning_rate=0.7)(20.0, f_train_0, f_test_0, kernel_test)
    for a, b in zip(ours, double, strict=True):
        assert a.dtype == jnp.float32
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)


def test_strict_promotion_and_integer_targets():
    """No implicit rank or dtype promotion inside (equinox's strict test settings); one-hot integer targets work."""
    kernel_train, kernel_test = gram_kernels(9, 4, 2, 3, 20)
    labels = np.eye(3, dtype=np.int32)[[0, 2, 1, 2]]
    _, f_train_0, f_test_0 = problem(9, 4, 2, 3)
    with jax.numpy_rank_promotion("raise"), jax.numpy_dtype_promotion("strict"):
        for train, test in ((kernel_train, kernel_test), (np.einsum("ijkk->ij", kernel_train),
                                                          np.einsum("ijkk->ij", kernel_test))):
            predict_fn = gradient_descent_mse(train, labels, learning_rate=0.5, ridge=1e-3)
            f_train, f_test = predict_fn(jnp.array([1.0, 2.0]), f_train_0, f_test_0, test)
            assert f_train.shape == (2, 4, 3) and f_test.shape == (2, 2, 3) and f_train.dtype == jnp.float64
            float_targets = gradient_descent_mse(train, labels.astype(float), learning_rate=0.5, ridge=1e-3)
            np.testing.assert_array_equal(f_test, float_targets(jnp.array([1.0, 2.0]), f_train_0, f_test_0, test)[1])
            assert kernel_regression(train, labels, test).shape == (2, 3)


def _errors_setup():
    kernel_train, kernel_test = gram_kernels(8, 4, 2, 2, 10)
    targets, f_train_0, f_test_0 = problem(8, 4, 2, 2)
    return kernel_train, kernel_test, targets, f_train_0, f_test_0


@pytest.mark.parametrize(("make", "match"), [
    (lambda k, kt, y, f, g: gradient_descent_mse(k, y[:, 0]), r"targets must be \(n, K\), got shape \(4,\)"),
    (lambda k, kt, y, f, g: gradient_descent_mse(k, y[:3]), r"kernel_train_train must be .* got shape \(4, 4, 2, 2\)"),
    (lambda k, kt, y, f, g: gradient_descent_mse(k[..., :1, :1], y), r"full \(4, 4, 2, 2\).* \(4, 4, 1, 1\)"),
    (lambda k, kt, y, f, g: gradient_descent_mse(k, y, learning_rate=-0.1), r"learning_rate must be > 0, got -0.1"),
    (lambda k, kt, y, f, g: gradient_descent_mse(k, y, learning_rate=0.0), r"learning_rate must be > 0, got 0.0"),
    (lambda k, kt, y, f, g: gradient_descent_mse(k, y, ridge=-1e-3), r"ridge must be ≥ 0, got -0.001"),
    (lambda k, kt, y, f, g: gradient_descent_mse(k, y, ridge=np.ones(2)), r"ridge must be a scalar"),
    (lambda k, kt, y, f, g: gradient_descent_mse(k, y)(1.0, f[:3]), r"outputs_train_0 must .* got \(3, 2\)"),
    (lambda k, kt, y, f, g: gradient_descent_mse(k, y)(1.0, f, g), r"together .* kernel_test_train None"),
    (lambda k, kt, y, f, g: gradient_descent_mse(k, y)(1.0, f, g[:1], kt), r"outputs_test_0 must be .*got \(1, 2\)"),
    (lambda k, kt, y, f, g: gradient_descent_mse(k, y)(1.0, f, g, kt[:, :3]), r"kernel_test_train must be"),
    (lambda k, kt, y, f, g: gradient_descent_mse(k, y)(1.0, f, g, kt.sum((2, 3))), r"must be full like"),
    (lambda k, kt, y, f, g: kernel_regression(k, y, kt[:, :, :1]), r"kernel_test_train must be .*\(2, 4, 1, 2\)"),
])
def test_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make(*_errors_setup())
    with pytest.raises(TypeError, match="targets must be real, got dtype complex"):
        gradient_descent_mse(np.eye(2), np.ones((2, 1), complex))
