from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ntkcv.cv as cv
from tests.cv.matrices import psd_from_spectrum

# few distinct sizes: each new matrix size costs an XLA compilation
spectra = (
    st.sampled_from([2, 3, 6])
    .flatmap(lambda n: st.lists(st.floats(0.0, 10.0), min_size=n, max_size=n))
    .filter(lambda s: sum(s) > 1e-3)
)
few_examples = settings(max_examples=25, deadline=None)

# property tests call the jitted CVs: one compilation per matrix size instead of one per operation
jit = SimpleNamespace(
    **{name: jax.jit(getattr(cv, name)) for name in cv.spectral.__all__ if name != "top_eigenvalues"}
)
jit.spectrum_cvs = jax.jit(
    lambda k: (
        cv.spectrum(k),
        cv.top_eigenvalues(k, 2),
        cv.max_eigenvalue(k),
        cv.participation_ratio(k),
        cv.frobenius_norm(k),
    )
)


def reference_entropy(matrix):
    lam = np.clip(np.linalg.eigvalsh(np.asarray(matrix)), 0, None)
    p = lam / lam.sum()
    p = p[p > 0]
    return -np.sum(p * np.log(p))


@few_examples
@given(st.sampled_from([1, 2, 5, 30]), st.floats(1e-3, 1e3))
def test_entropy_of_scaled_identity_is_log_n(n, c):
    np.testing.assert_allclose(jit.entropy(c * jnp.eye(n)), np.log(n), rtol=1e-12, atol=1e-12)


@few_examples
@given(st.sampled_from([2, 3, 6]), st.integers(0, 1000))
def test_rank_one_entropy_is_zero(n, seed):
    v = np.random.default_rng(seed).normal(size=n)
    assert abs(float(jit.entropy(np.outer(v, v)))) < 1e-10


@few_examples
@given(spectra, st.integers(0, 100), st.floats(1e-3, 1e3))
def test_entropy_invariant_to_scale_and_permutation(eigenvalues, seed, c):
    kernel = psd_from_spectrum(eigenvalues, seed)
    perm = np.random.default_rng(seed).permutation(len(eigenvalues))
    s = float(jit.entropy(kernel))
    np.testing.assert_allclose(jit.entropy(c * kernel), s, atol=1e-9)
    np.testing.assert_allclose(jit.entropy(kernel[perm][:, perm]), s, atol=1e-9)


@few_examples
@given(spectra, st.integers(0, 100))
def test_entropy_bounds_and_reference(eigenvalues, seed):
    kernel = psd_from_spectrum(eigenvalues, seed)
    s = float(jit.entropy(kernel))
    assert -1e-12 <= s <= np.log(len(eigenvalues)) + 1e-12
    np.testing.assert_allclose(s, reference_entropy(kernel), atol=1e-9)
    np.testing.assert_allclose(jit.effective_entropy(kernel), s / np.log(len(eigenvalues)), atol=1e-9)
    np.testing.assert_allclose(jit.effective_rank(kernel), np.exp(s), rtol=1e-9)


@few_examples
@given(spectra, spectra, st.integers(0, 100))
def test_trace_is_additive_and_matches_spectrum(a, b, seed):
    n = min(len(a), len(b))
    ka, kb = psd_from_spectrum(a[:n], seed), psd_from_spectrum(b[:n], seed + 1)
    np.testing.assert_allclose(jit.trace(ka + kb), jit.trace(ka) + jit.trace(kb), rtol=1e-12)
    np.testing.assert_allclose(jit.trace(ka), sum(a[:n]), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(jit.mean_trace(ka), sum(a[:n]) / n, rtol=1e-9, atol=1e-9)


@few_examples
@given(spectra, st.integers(0, 100))
def test_spectrum_against_numpy(eigenvalues, seed):
    kernel = psd_from_spectrum(eigenvalues, seed)
    expected = np.sort(np.linalg.eigvalsh(np.asarray(kernel)))[::-1]
    spectrum, top, largest, ratio, norm = jit.spectrum_cvs(kernel)
    np.testing.assert_allclose(spectrum, expected, atol=1e-9)
    np.testing.assert_allclose(top, expected[:2], atol=1e-9)
    np.testing.assert_allclose(largest, expected[0], atol=1e-9)
    positive = np.clip(expected, 0, None)
    np.testing.assert_allclose(ratio, positive.sum() ** 2 / (positive**2).sum(), rtol=1e-9)
    np.testing.assert_allclose(norm, np.linalg.norm(np.asarray(kernel)), rtol=1e-12)


def test_effective_rank_and_participation_ratio_of_identity():
    assert float(cv.effective_rank(jnp.eye(7))) == pytest.approx(7.0)
    assert float(cv.participation_ratio(jnp.eye(7))) == pytest.approx(7.0)


def test_condition_number():
    kernel = psd_from_spectrum([4.0, 2.0, 0.5])
    assert float(cv.condition_number(kernel)) == pytest.approx(8.0)
    assert float(cv.condition_number(psd_from_spectrum([1.0, 0.0, 0.0]))) == np.inf


def test_negative_mass_reports_clipped_eigenvalues():
    kernel = psd_from_spectrum([3.0, 1.0, -1.0])
    assert float(cv.negative_mass(kernel)) == pytest.approx(0.2)
    assert float(cv.negative_mass(psd_from_spectrum([3.0, 1.0, 0.0]))) == pytest.approx(0.0, abs=1e-12)
    # the clipped eigenvalue does not enter the entropy
    assert float(cv.entropy(kernel)) == pytest.approx(reference_entropy(kernel))


def test_four_dimensional_kernel_is_flattened_sample_major():
    full = psd_from_spectrum(np.arange(1.0, 7.0))  # (N·K, N·K) with N = 3, K = 2
    four_d = np.asarray(full).reshape(3, 2, 3, 2).transpose(0, 2, 1, 3)  # (N, N, K, K)
    np.testing.assert_allclose(cv.spectrum(four_d), cv.spectrum(full), atol=1e-12)
    assert float(cv.trace(four_d)) == pytest.approx(21.0)
    assert float(cv.mean_trace(four_d)) == pytest.approx(7.0)  # per sample: N = 3


def test_works_under_jit_and_vmap():
    kernels = jnp.stack([psd_from_spectrum([1.0, 1.0, 1.0, 1.0]), psd_from_spectrum([1.0, 0.0, 0.0, 0.0])])
    np.testing.assert_allclose(jax.jit(jax.vmap(cv.entropy))(kernels), [np.log(4), 0.0], atol=1e-9)


@pytest.mark.parametrize("shape", [(3,), (2, 3), (2, 3, 3, 2), (2, 2, 2), (0, 0)])
def test_wrong_shapes_raise_naming_the_shape(shape):
    with pytest.raises(ValueError, match=str(shape).replace("(", r"\(").replace(")", r"\)")):
        cv.entropy(jnp.ones(shape))


def test_top_eigenvalues_rejects_bad_k():
    with pytest.raises(ValueError, match="k=5"):
        cv.top_eigenvalues(jnp.eye(3), 5)


def test_zero_kernel_gives_nan_with_warning():
    with pytest.warns(RuntimeWarning, match="identically zero"):
        value = jax.block_until_ready(jax.jit(cv.entropy)(jnp.zeros((4, 4))))
    assert np.isnan(value)
    with pytest.warns(RuntimeWarning, match="identically zero"):
        assert float(cv.trace(jnp.zeros((4, 4)))) == 0.0


def test_nan_kernel_gives_nan_with_warning():
    kernel = jnp.eye(3).at[0, 1].set(jnp.nan)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        value = jax.block_until_ready(jax.jit(cv.entropy)(kernel))
    assert np.isnan(value)


def test_warn_false_gives_nan_silently(recwarn):
    kernel = jnp.eye(3).at[0, 0].set(jnp.nan)
    values = jax.jit(lambda k: cv.collective_variables(k, ["entropy", "trace"], warn=False))(kernel)
    assert np.isnan(values["entropy"]) and np.isnan(values["trace"])
    assert np.isnan(jax.jit(lambda k: cv.spectrum(k, warn=False))(jnp.zeros((3, 3)) * jnp.nan)).all()
    assert np.isnan(cv.collective_variables(jnp.zeros((3, 3)), ["entropy"], warn=False)["entropy"])
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_single_sample_kernel():
    kernel = jnp.array([[2.0]])
    assert float(cv.entropy(kernel)) == 0.0
    assert float(cv.effective_rank(kernel)) == 1.0
    with pytest.warns(RuntimeWarning, match="1x1"):
        assert np.isnan(cv.effective_entropy(kernel))
