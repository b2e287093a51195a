"""The model profile (one sample's forward FLOPs and memory) that the cost and memory models read."""

import jax
import pytest

from ntkcv.ntk.layout import canonical_fn, output_layout
from ntkcv.ntk.profile import profile_model
from tests.ntk.models import make_case


@pytest.mark.parametrize("case", ["mlp_tanh", "cnn", "sequence"])
def test_profile_equals_the_analysis_of_a_default_compile(case):
    """The profile compiles at LLVM optimisation level 0 with the quick CPU options (faster); XLA's analyses must not
    change with them."""
    model, x, _ = make_case(case)
    layout = output_layout(model.apply_fn, model.params, x, (-1,))
    f = canonical_fn(model.apply_fn, layout)
    profile = profile_model(f, model.params, x, layout.kept_size, layout.traced_size, 1)
    compiled = jax.jit(f).lower(model.params, x[:1]).compile()
    cost = compiled.cost_analysis()
    memory = compiled.memory_analysis()
    assert profile.forward_flops == float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
    assert profile.activation_bytes == memory.temp_size_in_bytes + memory.output_size_in_bytes
