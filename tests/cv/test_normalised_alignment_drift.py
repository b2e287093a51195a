import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntkcv.cv as cv
from tests.cv.matrices import psd_from_spectrum

KERNEL = psd_from_spectrum([5.0, 2.0, 1.0, 0.5, 0.1, 0.0], seed=3)


def test_cosine_kernel_and_entropy_match_numpy():
    k = np.asarray(KERNEL)
    d = np.sqrt(np.diag(k))
    cosine = k / np.outer(d, d)
    np.testing.assert_allclose(cv.cosine_kernel(KERNEL), cosine, rtol=1e-12)
    lam = np.clip(np.linalg.eigvalsh(cosine), 0, None) / len(d)
    lam = lam[lam > 0]
    assert float(cv.cosine_entropy(KERNEL)) == pytest.approx(-np.sum(lam * np.log(lam)))
    # the cosine kernel forgets per-sample scales
    scale = np.diag([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    np.testing.assert_allclose(cv.cosine_entropy(scale @ k @ scale), cv.cosine_entropy(KERNEL), rtol=1e-10)


def test_magnitude_distribution():
    diagonal = np.array([1.0, 4.0, 9.0, 16.0])
    kernel = np.diag(diagonal)
    p = np.sqrt(diagonal) / np.sqrt(diagonal).sum()
    np.testing.assert_allclose(cv.magnitude_distribution(kernel), p, rtol=1e-12)
    assert float(cv.magnitude_entropy(kernel)) == pytest.approx(-np.sum(p * np.log(p)))
    assert float(cv.magnitude_variance(kernel)) == pytest.approx(np.var(4 * p))
    assert float(cv.magnitude_variance(jnp.eye(4))) == 0.0
    assert float(cv.magnitude_entropy(jnp.eye(4))) == pytest.approx(np.log(4))


def test_alignment_of_target_kernel_is_one():
    labels = jnp.array([0, 1, 1, 2, 0, 2, 1])
    one_hot = jax.nn.one_hot(labels, 3)
    target = one_hot @ one_hot.T
    for targets in (labels, one_hot):
        assert float(cv.target_alignment(3.0 * target, targets)) == pytest.approx(1.0)
        assert float(cv.centred_target_alignment(target, targets)) == pytest.approx(1.0)
    regression = jnp.linspace(-1.0, 1.0, 7)
    assert float(cv.target_alignment(jnp.outer(regression, regression), regression)) == pytest.approx(1.0)


def test_alignment_against_numpy():
    y = np.random.default_rng(0).normal(size=(6, 2))
    k, t = np.asarray(KERNEL), y @ y.T
    h = np.eye(6) - 1.0 / 6
    plain = np.sum(k * t) / (np.linalg.norm(k) * np.linalg.norm(t))
    kc, tc = h @ k @ h, h @ t @ h
    centred = np.sum(kc * tc) / (np.linalg.norm(kc) * np.linalg.norm(tc))
    assert float(cv.target_alignment(KERNEL, y)) == pytest.approx(plain)
    assert float(cv.centred_target_alignment(KERNEL, y)) == pytest.approx(centred)


def test_full_kernel_target_is_vec_outer_product():
    labels = jnp.array([0, 2, 1])  # N = 3 samples, K = 3 outputs
    flat = np.eye(3)[[0, 2, 1]].reshape(9)
    np.testing.assert_allclose(cv.target_kernel(labels, 9), np.outer(flat, flat))
    np.testing.assert_allclose(cv.target_kernel(labels, 3), np.eye(3))
    with pytest.raises(ValueError, match=r"\(4,\)"):
        cv.target_kernel(jnp.arange(4), 9)


def test_drift_of_identical_kernels_is_zero():
    assert float(cv.relative_distance(KERNEL, KERNEL)) == 0.0
    assert float(cv.cosine_distance(KERNEL, 2.0 * KERNEL)) == pytest.approx(0.0, abs=1e-12)
    assert float(cv.subspace_overlap(KERNEL, 2.0 * KERNEL, 3)) == pytest.approx(1.0)


def test_drift_against_numpy():
    other = np.asarray(psd_from_spectrum([4.0, 3.0, 1.0, 0.5, 0.2, 0.1], seed=5))
    k = np.asarray(KERNEL)
    assert float(cv.relative_distance(KERNEL, other)) == pytest.approx(
        np.linalg.norm(k - other) / np.linalg.norm(k)
    )
    cosine = np.sum(k * other) / (np.linalg.norm(k) * np.linalg.norm(other))
    assert float(cv.cosine_distance(KERNEL, other)) == pytest.approx(1 - cosine)
    u0, u1 = np.linalg.eigh(k)[1][:, ::-1][:, :2], np.linalg.eigh(other)[1][:, ::-1][:, :2]
    assert float(cv.subspace_overlap(KERNEL, other, 2)) == pytest.approx(np.sum((u0.T @ u1) ** 2) / 2)


def test_drift_shape_mismatch_raises():
    with pytest.raises(ValueError, match=r"\(6, 6\) and \(5, 5\)"):
        cv.relative_distance(KERNEL, jnp.eye(5))
