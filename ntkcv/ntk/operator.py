"""Matrix-free NTK operator ``v ↦ Θv``: one pullback and one push-forward, never Θ or the Jacobian.

With ``J`` the Jacobian of the outputs ``(N, O, R)`` with respect to the parameters, the traced kernel
acts on ``v ∈ ℝ^{N·O}`` as

.. math::
   (Θ v)_{ao} = \\sum_r \\big[J \\, (J^\\top (v ⊗ e_r))\\big]_{a o r}

i.e. for each traced output ``r`` a vector-Jacobian product of the whole batch (cotangent ``v ⊗ e_r``)
followed by a Jacobian-vector product. Memory is ``O(N·O·R + R·P)`` plus the activations of one chunk
of ``chunk_size`` samples; the samples are processed in chunks with ``lax.scan``. The chunks are spread over
the devices (all processes' under ``jax.distributed``, see :mod:`ntkcv.ntk.devices`): each device pulls back its
chunks, the gradients are summed over the devices (one all-reduce of ``R·P`` numbers per product) and each
device pushes them forward through its chunks; ``Θv`` comes back replicated on every device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PyTree, Shaped

from ntkcv.ntk.devices import AXIS, laid_out, num_devices, on_devices
from ntkcv.ntk.layout import ApplyFn, canonical_fn, output_layout
from ntkcv.ntk.profile import profile_model
from ntkcv.ntk.validate import check_inputs, check_params


class NTKOperator(NamedTuple):
    """``matvec(v)`` applies Θ to ``v`` of shape ``(dim,)``, ordered ``(sample, kept output)`` row-major
    like :func:`ntkcv.flatten_kernel`; ``dim = N·O``."""

    matvec: Callable[[Float[Array, " dim"]], Float[Array, " dim"]]
    dim: int
    dtype: jnp.dtype


def ntk_operator(
    apply_fn: ApplyFn,
    params: PyTree,
    x: Shaped[Array, "N ..."],
    *,
    trace_axes: Sequence[int] = (-1,),
    chunk_size: int | None = None,
    precision: str | None = "highest",
) -> NTKOperator:
    """The NTK of ``apply_fn`` at ``params`` on the probe set ``x`` as a matrix-free linear operator.

    Args:
      apply_fn: ``apply_fn(params, x) -> (N, *out)``; samples must not interact (no batch statistics).
      params: pytree of floating-point arrays, all differentiated.
      x: probe inputs ``(N, …)``.
      trace_axes: output axes summed over, as in :func:`ntkcv.ntk_fn`; ``()`` gives the full kernel.
      chunk_size: samples per forward/backward pass, at most (and by default) each device's share of the ``N``
        samples; bounds activation memory.
      precision: matmul precision inside the operator (``"highest"``: full float32 even on TF32 GPUs).

    Returns:
      :class:`NTKOperator` whose ``matvec`` is pure and jit-able.
    """
    check_params(params)
    check_inputs(x)
    layout = output_layout(apply_fn, params, x, trace_axes)
    f = canonical_fn(apply_fn, layout)
    n, kept, traced, devices = x.shape[0], layout.kept_size, layout.traced_size, num_devices()
    share = math.ceil(n / devices)  # samples per device
    chunk = share if chunk_size is None else min(int(chunk_size), share)
    if chunk < 1:
        raise ValueError(f"chunk_size must be a positive number of samples, got {chunk_size}")
    count = math.ceil(n / chunk / devices) * devices  # a whole number of chunks per device
    pad = count * chunk - n
    x_chunks = jnp.concatenate([x, jnp.broadcast_to(x[:1], (pad,) + x.shape[1:])]) if pad else x
    x_chunks = x_chunks.reshape((count, chunk) + x.shape[1:])
    basis = jnp.eye(traced, dtype=jax.eval_shape(f, params, x[:1]).dtype)

    def pullback(total, chunk_inputs):
        x_chunk, v_chunk = chunk_inputs
        _, vjp_fn = jax.vjp(lambda p: f(p, x_chunk), params)
        grads = jax.vmap(lambda e: vjp_fn(v_chunk[:, :, None] * e[None, None, :])[0])(basis)  # leaves (R, *leaf)
        return jax.tree_util.tree_map(jnp.add, total, grads), None

    def push_forward(x_chunk, grads):
        tangents = jax.vmap(lambda g: jax.jvp(lambda p: f(p, x_chunk), (params,), (g,))[1])(grads)
        return jnp.einsum("rcor->co", tangents)  # (chunk, O)

    def device_matvec(chunks):  # one device's chunks of (x, v) -> its chunks of Θv
        zeros = jax.tree_util.tree_map(lambda a: jnp.zeros((traced,) + a.shape, a.dtype), params)
        grads, _ = jax.lax.scan(pullback, zeros, chunks)
        if devices > 1:
            grads = jax.lax.psum(grads, AXIS)
        return jax.lax.map(lambda x_chunk: push_forward(x_chunk, grads), chunks[0])

    def matvec(v: Float[Array, " dim"]) -> Float[Array, " dim"]:
        with jax.default_matmul_precision(precision):
            v = jnp.asarray(v).reshape(n, kept)
            v_chunks = jnp.pad(v, ((0, pad), (0, 0))).reshape(count, chunk, kept)
            out = laid_out(on_devices(device_matvec, (x_chunks, v_chunks)), gather=True)
            return out.reshape(count * chunk, kept)[:n].reshape(-1)

    return NTKOperator(matvec, n * kept, basis.dtype)


def matvec_flops(
    apply_fn: ApplyFn, params: PyTree, x: Shaped[Array, "N ..."], *, trace_axes: Sequence[int] = (-1,)
) -> float:
    """Estimated FLOPs of one ``matvec`` of :func:`ntk_operator`: for each of the ``R`` traced outputs a
    pullback and a push-forward over the ``N`` samples, about 4 forward passes (XLA's cost analysis of
    one sample's forward pass)."""
    num_params = check_params(params)
    layout = output_layout(apply_fn, params, x, trace_axes)
    f = canonical_fn(apply_fn, layout)
    profile = profile_model(f, params, x, layout.kept_size, layout.traced_size, num_params)
    return 4.0 * layout.traced_size * x.shape[0] * profile.forward_flops
