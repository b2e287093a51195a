"""Test matrices with known spectra, and a real NTK."""

import functools

import jax
import jax.numpy as jnp
import numpy as np


def psd_from_spectrum(eigenvalues, seed=0):
    """``Q diag(λ) Qᵀ`` with ``Q`` Haar-random orthogonal."""
    eigenvalues = np.asarray(eigenvalues, dtype=np.float64)
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.normal(size=(eigenvalues.size, eigenvalues.size)))
    q = q * np.sign(np.diag(r))
    return (q * eigenvalues) @ q.T


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def mlp_jacobian(num_inputs=200, num_outputs=10, width=24, dim=4, seed=0):
    """Jacobian ``(num_inputs·num_outputs, P)`` of a two-hidden-layer tanh MLP; its NTK is ``J Jᵀ``."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    sizes = [(dim, width), (width, width), (width, num_outputs)]
    params = [jax.random.normal(k, s) / np.sqrt(s[0]) for k, s in zip(keys[:3], sizes, strict=True)]
    x = jax.random.normal(keys[3], (num_inputs, dim))

    def outputs(params, sample):
        h = jnp.tanh(sample @ params[0])
        h = jnp.tanh(h @ params[1])
        return h @ params[2]

    jacobian = jax.vmap(jax.jacrev(outputs), in_axes=(None, 0))(params, x)  # leaves (N, K, *leaf)
    return jnp.concatenate([j.reshape(num_inputs * num_outputs, -1) for j in jacobian], axis=1)
