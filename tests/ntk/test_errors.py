"""Bad input raises errors that name the problem; non-finite outputs give NaN and a warning."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntkcv

APPLY = lambda p, x: jnp.tanh(x @ p["w"])  # noqa: E731
PARAMS = {"w": jnp.ones((3, 2))}
X = jnp.ones((4, 3))


def test_params_without_array_leaves():
    with pytest.raises(ValueError, match="no trainable parameters"):
        ntkcv.ntk_fn(APPLY)({}, X)
    with pytest.raises(TypeError, match=r"params leaf \['w'\] must be a floating-point array"):
        ntkcv.ntk_fn(APPLY)({"w": jnp.ones((3, 2), jnp.int32)}, X)


def test_inputs_with_different_feature_shapes():
    with pytest.raises(ValueError, match=r"same feature shape.*\(4, 3\).*\(2, 5\)"):
        ntkcv.ntk_fn(APPLY)(PARAMS, X, jnp.ones((2, 5)))


@pytest.mark.parametrize("axes, message", [((2,), "out of range"), ((-3,), "out of range"), ((0,), "batch axis"),
                                           ((1, -1), "repeated")])
def test_trace_axes_out_of_range(axes, message):
    with pytest.raises(ValueError, match=message):
        ntkcv.ntk_fn(APPLY, trace_axes=axes)(PARAMS, X)


def test_trace_axes_must_be_ints():
    with pytest.raises(TypeError, match="trace_axes"):
        ntkcv.ntk_fn(APPLY, trace_axes=-1)


def test_apply_fn_whose_output_is_not_an_array():
    with pytest.raises(TypeError, match=r"single array.*dict"):
        ntkcv.ntk_fn(lambda p, x: {"logits": APPLY(p, x)})(PARAMS, X)
    with pytest.raises(ValueError, match="batch axis first"):
        ntkcv.ntk_fn(lambda p, x: APPLY(p, x).sum(0))(PARAMS, X)


def test_unknown_implementation_lists_the_allowed_ones():
    with pytest.raises(ValueError, match=r"'jacobian'.*'ntvp'.*got 'fast'"):
        ntkcv.ntk_fn(APPLY, implementation="fast")


def test_memory_budget_too_small_for_one_tile():
    with pytest.raises(ValueError, match="too small for one tile"):
        ntkcv.ntk_fn(APPLY, memory_budget=8)(PARAMS, X)
    with pytest.raises(ValueError, match="positive number of bytes"):
        ntkcv.ntk_fn(APPLY, memory_budget=-1)


def test_non_finite_outputs_give_nan_and_a_warning():
    params = {"w": jnp.ones((3, 2)).at[0, 0].set(jnp.nan)}
    with pytest.warns(RuntimeWarning, match="non-finite entries, returned as NaN"):
        kernel = np.asarray(ntkcv.ntk_fn(APPLY)(params, X))
    assert np.isnan(kernel).all()
    overflow = lambda p, x: jnp.exp(x @ p["w"])  # noqa: E731
    with pytest.warns(RuntimeWarning, match="non-finite"):
        kernel = np.asarray(ntkcv.ntk_fn(overflow)({"w": jnp.full((3, 2), 100.0)}, X))
    assert np.isnan(kernel).all() and not np.isinf(kernel).any()


def test_warn_false_gives_nan_from_a_program_without_host_callbacks(recwarn):
    params = {"w": jnp.ones((3, 2)).at[0, 0].set(jnp.nan)}
    kernel_fn = ntkcv.ntk_fn(APPLY, warn=False)
    assert np.isnan(np.asarray(kernel_fn(params, X))).all()
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
    assert "callback" not in kernel_fn.lower(params, X).as_text()
    assert "callback" in ntkcv.ntk_fn(APPLY).lower(params, X).as_text()


def test_finite_kernels_do_not_warn(recwarn):
    jax.block_until_ready(ntkcv.ntk_fn(APPLY)(PARAMS, X))
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_adapters_reject_wrong_objects():
    with pytest.raises(TypeError, match=r"flax\.linen\.Module"):
        ntkcv.from_linen(object(), {"params": {}})
    with pytest.raises(ValueError, match="'params' collection"):
        import flax.linen as nn
        ntkcv.from_linen(nn.Dense(2), {"batch_stats": {}})
    with pytest.raises(TypeError, match=r"flax\.nnx\.Module"):
        ntkcv.from_nnx(object())
