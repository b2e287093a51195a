"""Agreement with neural-tangents 0.6.5 (the peer) on the reference MLP and CNN.

neural-tangents averages over the traced output axes; ntkcv sums: ours = K · theirs."""

import jax
import numpy as np
import pytest

import ntkcv
from benchmarks.reference_models import CNN_SPEC, MLP_SPEC, build, peer_available, run_peer
from tests.ntk.models import relative_error

pytestmark = [pytest.mark.peer, pytest.mark.skipif(not peer_available(), reason="peer environment absent")]


@pytest.mark.parametrize("spec", [MLP_SPEC, CNN_SPEC], ids=["mlp", "cnn"])
@pytest.mark.standard_dtype_promotion  # flax's avg_pool divides by a NumPy integer
def test_agrees_with_neural_tangents(spec):
    module = build(spec)
    x = np.asarray(jax.random.normal(jax.random.key(0), (6, 28, 28, 1)))
    variables = module.init(jax.random.key(1), x)
    model = ntkcv.from_linen(module, variables)
    peer = run_peer(spec, x, variables, trace_axes=(-1,), implementations=(1, 3), reps=1)
    ours = ntkcv.ntk_fn(model.apply_fn)(model.params, x)
    for implementation in (1, 3):
        assert relative_error(ours, 10 * peer[f"ntk_{implementation}"]) <= 1e-5
    peer_full = run_peer(spec, x[:3], variables, trace_axes=(), implementations=(3,), reps=1)
    ours_full = ntkcv.ntk_fn(model.apply_fn, trace_axes=())(model.params, x[:3])
    assert ours_full.shape == peer_full["ntk_3"].shape == (3, 3, 10, 10)
    assert relative_error(ours_full, peer_full["ntk_3"]) <= 1e-5
