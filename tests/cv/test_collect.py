import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntkcv.cv as cv
from tests.cv.matrices import psd_from_spectrum

KERNEL = psd_from_spectrum([5.0, 2.0, 1.0, 0.5, 0.1, 0.0], seed=3)
REFERENCE = psd_from_spectrum([4.0, 2.0, 1.5, 0.5, 0.2, 0.1], seed=4)
LABELS = jnp.array([0, 1, 0, 1, 1, 0])


def test_matches_the_individual_functions():
    cvs = cv.collective_variables(KERNEL, labels=LABELS, reference=REFERENCE, top_k=3)
    assert set(name.split("/")[0] for name in cvs) == set(cv.AVAILABLE)
    expected = {
        "entropy": cv.entropy(KERNEL),
        "effective_entropy": cv.effective_entropy(KERNEL),
        "trace": cv.trace(KERNEL),
        "mean_trace": cv.mean_trace(KERNEL),
        "effective_rank": cv.effective_rank(KERNEL),
        "participation_ratio": cv.participation_ratio(KERNEL),
        "max_eigenvalue": cv.max_eigenvalue(KERNEL),
        "condition_number": cv.condition_number(KERNEL),
        "frobenius_norm": cv.frobenius_norm(KERNEL),
        "negative_mass": cv.negative_mass(KERNEL),
        "cosine_entropy": cv.cosine_entropy(KERNEL),
        "magnitude_entropy": cv.magnitude_entropy(KERNEL),
        "magnitude_variance": cv.magnitude_variance(KERNEL),
        "target_alignment": cv.target_alignment(KERNEL, LABELS),
        "centred_target_alignment": cv.centred_target_alignment(KERNEL, LABELS),
        "relative_distance": cv.relative_distance(REFERENCE, KERNEL),
        "cosine_distance": cv.cosine_distance(REFERENCE, KERNEL),
        "subspace_overlap": cv.subspace_overlap(REFERENCE, KERNEL, 3),
    }
    for i, value in enumerate(cv.top_eigenvalues(KERNEL, 3)):
        expected[f"top_eigenvalues/{i}"] = value
    for c in range(2):
        expected[f"class_entropy/{c}"] = cv.classwise_entropy(KERNEL, LABELS, num_classes=2)[c]
        expected[f"class_trace/{c}"] = cv.classwise_trace(KERNEL, LABELS, num_classes=2)[c]
    assert cvs.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_allclose(cvs[name], value, rtol=1e-10, atol=1e-12, err_msg=name)


def test_default_names_need_no_extra_inputs_and_top_k_is_clipped():
    cvs = cv.collective_variables(jnp.eye(3))
    assert "target_alignment" not in cvs and "relative_distance" not in cvs
    assert [name for name in cvs if name.startswith("top_")] == [f"top_eigenvalues/{i}" for i in range(3)]


def test_jit_compiles_once_and_calls_eigvalsh_once():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def compute(kernel):
        return cv.collective_variables(
            kernel, ["entropy", "effective_rank", "max_eigenvalue", "negative_mass"]
        )

    compute(KERNEL)
    compute(2.0 * KERNEL)
    jaxpr = str(
        jax.make_jaxpr(lambda k: cv.collective_variables(k, ["entropy", "participation_ratio"]))(KERNEL)
    )
    assert jaxpr.count(" eigh[") == 1  # the primitive, once


def test_precomputed_eigenvalues_are_used_and_give_the_same_values():
    names = ["entropy", "effective_rank", "participation_ratio", "trace"]
    shared = jax.make_jaxpr(lambda k: cv.collective_variables(k, names, eigenvalues=cv.spectrum(k)))(KERNEL)
    assert str(shared).count(" eigh[") == 1
    given = cv.collective_variables(KERNEL, names, eigenvalues=cv.spectrum(KERNEL))
    computed = cv.collective_variables(KERNEL, names)
    for name in names:
        np.testing.assert_allclose(given[name], computed[name], rtol=1e-12)


def test_labels_under_jit_need_num_classes():
    fn = jax.jit(lambda k, y: cv.collective_variables(k, ["class_trace"], labels=y, num_classes=2))
    np.testing.assert_allclose(
        fn(KERNEL, LABELS)["class_trace/1"], cv.classwise_trace(KERNEL, LABELS, num_classes=2)[1]
    )
    with pytest.raises(ValueError, match="num_classes"):
        jax.jit(lambda k, y: cv.collective_variables(k, ["class_trace"], labels=y))(KERNEL, LABELS)


def test_errors():
    with pytest.raises(ValueError, match=r"allowed names are .*'entropy'"):
        cv.collective_variables(KERNEL, ["entropy", "nonsense"])
    with pytest.raises(ValueError, match="`labels`"):
        cv.collective_variables(KERNEL, ["target_alignment"])
    with pytest.raises(ValueError, match="`reference`"):
        cv.collective_variables(KERNEL, ["cosine_distance"])
    with pytest.raises(ValueError, match=r"\(4, 4\)"):
        cv.collective_variables(KERNEL, ["cosine_distance"], reference=jnp.eye(4))
    with pytest.raises(ValueError, match=r"\(6, 5\)"):
        cv.collective_variables(jnp.ones((6, 5)))
    with pytest.raises(TypeError, match="string"):
        cv.collective_variables(KERNEL, "entropy")
