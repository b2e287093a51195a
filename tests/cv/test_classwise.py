import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntkcv.cv as cv
from tests.cv.matrices import psd_from_spectrum

LABELS = np.array([0, 2, 0, 1, 2, 0])


def numpy_entropy(block):
    lam = np.clip(np.linalg.eigvalsh(block), 0, None)
    p = lam[lam > 0] / lam.sum()
    return -np.sum(p * np.log(p))


def test_traced_kernel_blocks_match_slicing():
    kernel = np.asarray(psd_from_spectrum(np.arange(1.0, 7.0), seed=1))
    blocks = [kernel[np.ix_(LABELS == c, LABELS == c)] for c in range(3)]
    fn = jax.jit(
        lambda k, y: (cv.classwise_entropy(k, y, num_classes=3), cv.classwise_trace(k, y, num_classes=3))
    )
    entropies, traces = fn(kernel, LABELS)
    np.testing.assert_allclose(entropies, [numpy_entropy(b) for b in blocks], atol=1e-10)
    np.testing.assert_allclose(traces, [np.trace(b) for b in blocks], rtol=1e-12)


def test_full_kernel_blocks_span_all_outputs():
    kernel = np.asarray(psd_from_spectrum(np.linspace(0.1, 3.0, 12), seed=2))  # N = 6, K = 2
    rows = np.repeat(LABELS, 2)
    blocks = [kernel[np.ix_(rows == c, rows == c)] for c in range(3)]
    np.testing.assert_allclose(
        cv.classwise_entropy(kernel, LABELS, num_classes=3), [numpy_entropy(b) for b in blocks], atol=1e-10
    )
    four_d = kernel.reshape(6, 2, 6, 2).transpose(0, 2, 1, 3)
    np.testing.assert_allclose(
        cv.classwise_trace(four_d, LABELS, num_classes=3), [np.trace(b) for b in blocks], rtol=1e-12
    )


def test_absent_class():
    entropies = cv.classwise_entropy(jnp.eye(6), LABELS, num_classes=4)
    assert np.isnan(entropies[3]) and float(cv.classwise_trace(jnp.eye(6), LABELS, num_classes=4)[3]) == 0.0


def test_bad_labels_raise():
    with pytest.raises(ValueError, match="float"):
        cv.classwise_trace(jnp.eye(6), LABELS.astype(float), num_classes=3)
    with pytest.raises(ValueError, match=r"\(4,\)"):
        cv.classwise_trace(jnp.eye(6), LABELS[:4], num_classes=3)
