"""Properties of the kernel that hold for any model: symmetry, PSD, trace identity, linear closed form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ntkcv
from tests.ntk.models import dense_jacobian, make_case


@settings(max_examples=8, deadline=None)
@given(n=st.integers(1, 6), width=st.integers(1, 5), outputs=st.integers(1, 4), seed=st.integers(0, 2**16),
       implementation=st.sampled_from(["jacobian", "ntvp"]))
def test_kernel_is_symmetric_psd_and_its_trace_is_the_gradient_norm(n, width, outputs, seed, implementation):
    keys = jax.random.split(jax.random.key(seed), 4)
    params = {"w": jax.random.normal(keys[0], (3, width)), "b": jax.random.normal(keys[1], (width,)),
              "v": jax.random.normal(keys[2], (width, outputs))}
    apply_fn = lambda p, x: jnp.sin(x @ p["w"] + p["b"][None]) @ p["v"]  # noqa: E731
    x = jax.random.normal(keys[3], (n, 3))
    with jax.enable_x64(True):
        params64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)
        x64 = jnp.asarray(x, jnp.float64)
        kernel = np.asarray(ntkcv.ntk_fn(apply_fn, implementation=implementation)(params64, x64))
        jac = dense_jacobian(apply_fn, params64, x64)  # (n, K, P)
    np.testing.assert_allclose(kernel, kernel.T, rtol=1e-12, atol=1e-12)
    assert np.linalg.eigvalsh(kernel).min() >= -1e-9 * max(1.0, np.abs(kernel).max())
    np.testing.assert_allclose(np.trace(kernel), (jac**2).sum(), rtol=1e-10)


@pytest.mark.parametrize("implementation", ["jacobian", "ntvp", "auto"])
def test_linear_model_kernel_is_k_times_gram(implementation, dtype):
    """f = xW with K outputs: traced Θ = K·XXᵀ, full Θ = XXᵀ ⊗ I_K."""
    x1 = jax.random.normal(jax.random.key(0), (6, 4), dtype)
    x2 = jax.random.normal(jax.random.key(1), (3, 4), dtype)
    params = {"w": jax.random.normal(jax.random.key(2), (4, 5), dtype)}
    apply_fn = lambda p, x: x @ p["w"]  # noqa: E731
    gram = np.asarray(x1, np.float64) @ np.asarray(x2, np.float64).T
    traced = ntkcv.ntk_fn(apply_fn, implementation=implementation)(params, x1, x2)
    np.testing.assert_allclose(traced, 5 * gram, rtol=1e-5)
    full = ntkcv.ntk_fn(apply_fn, trace_axes=(), implementation=implementation)(params, x1, x2)
    np.testing.assert_allclose(ntkcv.flatten_kernel(full), np.kron(gram, np.eye(5)), rtol=1e-5, atol=1e-5)


def test_summed_not_averaged_over_several_traced_axes():
    """Outputs (N, 2, 3) traced over both axes: Θ = 6·XXᵀ for a linear model."""
    x = jax.random.normal(jax.random.key(0), (4, 3))
    params = {"w": jax.random.normal(jax.random.key(1), (3, 6))}
    apply_fn = lambda p, x: (x @ p["w"]).reshape(-1, 2, 3)  # noqa: E731
    kernel = ntkcv.ntk_fn(apply_fn, trace_axes=(1, 2))(params, x)
    np.testing.assert_allclose(kernel, 6 * np.asarray(x @ x.T), rtol=1e-5)
    partly = ntkcv.ntk_fn(apply_fn, trace_axes=(-1,))(params, x)  # kept axis of size 2
    assert partly.shape == (4, 4, 2, 2)
    np.testing.assert_allclose(partly[:, :, 0, 0], 3 * np.asarray(x @ x.T), rtol=1e-5)


@pytest.mark.parametrize("case", ["mlp_tanh", "sequence", "nnx"])
@pytest.mark.parametrize("trace_axes", [(-1,), ()])
def test_operator_agrees_with_materialised_kernel(case, trace_axes):
    model, x, _ = make_case(case)
    full = ntkcv.flatten_kernel(ntkcv.ntk_fn(model.apply_fn, trace_axes=trace_axes)(model.params, x))
    op = ntkcv.ntk_operator(model.apply_fn, model.params, x, trace_axes=trace_axes, chunk_size=2)
    assert op.dim == full.shape[0]
    vectors = jax.random.normal(jax.random.key(3), (3, op.dim))
    products = jax.jit(jax.vmap(op.matvec))(vectors)
    np.testing.assert_allclose(products, vectors @ np.asarray(full).T, rtol=2e-4, atol=2e-4 * np.abs(full).max())


def test_operator_never_materialises_the_kernel_or_jacobian():
    """At N=4096 with 10 outputs the full kernel (N·K)² would be 6.7 GB and the Jacobian 0.3 GB."""
    params = {"w": jnp.ones((8, 200)), "v": jnp.ones((200, 10))}
    apply_fn = lambda p, x: jnp.tanh(x @ p["w"]) @ p["v"]  # noqa: E731
    x = jnp.ones((4096, 8))
    op = ntkcv.ntk_operator(apply_fn, params, x, trace_axes=(), chunk_size=1024)
    memory = jax.jit(op.matvec).lower(jnp.ones(op.dim)).compile().memory_analysis()
    assert memory.temp_size_in_bytes < 64 * 2**20
