"""Tiles are sharded over all local devices: four forced CPU devices give the single-device kernel."""

import json
import os
import pathlib
import subprocess
import sys

SCRIPT = r"""
import json, logging, jax, jax.numpy as jnp, numpy as np, ntkcv
logging.basicConfig(level=logging.WARNING)
logging.getLogger("ntkcv.ntk").setLevel(logging.DEBUG)
from tests.ntk.models import make_case, reference_kernel, relative_error
assert len(jax.local_devices()) == 4, jax.local_devices()
model, _, _ = make_case("mlp_tanh")
x1 = jax.random.normal(jax.random.key(1), (10, 6))
x2 = jax.random.normal(jax.random.key(2), (7, 6))
errors = {}
for impl in ["jacobian", "ntvp", "structured"]:
    for trace_axes in [(-1,), ()]:
        for budget in [None, 20_000]:
            fn = ntkcv.ntk_fn(model.apply_fn, trace_axes=trace_axes, implementation=impl, memory_budget=budget)
            errors[f"{impl}{trace_axes}{budget}"] = relative_error(
                fn(model.params, x1, x2), reference_kernel(model.apply_fn, model.params, x1, x2, trace_axes))
        diag = ntkcv.ntk_fn(model.apply_fn, trace_axes=trace_axes, implementation=impl, diagonal=True)(model.params, x1)
        full = reference_kernel(model.apply_fn, model.params, x1, x1, trace_axes)
        errors[f"diag{impl}{trace_axes}"] = relative_error(diag, np.stack([full[i, i] for i in range(10)]))
for impl in ["jacobian", "structured"]:  # group kernels, tiled and sharded
    fn = ntkcv.ntk_fn(model.apply_fn, implementation=impl, groups="layers", memory_budget=20_000)
    errors[f"groups{impl}"] = relative_error(sum(fn(model.params, x1, x2).values()),
                                             reference_kernel(model.apply_fn, model.params, x1, x2, (-1,)))
from tests.ntk.models import budget_for_tile
cnn, _, _ = make_case("cnn")
c1, c2 = jax.random.normal(jax.random.key(1), (11, 8, 8, 2)), jax.random.normal(jax.random.key(2), (7, 8, 8, 2))
for trace_axes in [(-1,), ()]:  # below one tile per device: features built once per sample, then contracted
    budget = budget_for_tile(cnn, c1, trace_axes, "structured", 4)
    fn = ntkcv.ntk_fn(cnn.apply_fn, trace_axes=trace_axes, implementation="structured", memory_budget=budget)
    errors[f"split{trace_axes}"] = relative_error(
        fn(cnn.params, c1, c2), reference_kernel(cnn.apply_fn, cnn.params, c1, c2, trace_axes))
fn = ntkcv.ntk_fn(cnn.apply_fn, implementation="structured", groups="layers",
                  memory_budget=budget_for_tile(cnn, c1, (-1,), "structured", 4, "layers"))
errors["split_groups"] = relative_error(sum(fn(cnn.params, c1, c2).values()),
                                        reference_kernel(cnn.apply_fn, cnn.params, c1, c2, (-1,)))
print(json.dumps(errors))
"""


def test_kernel_sharded_over_four_devices_matches_reference():
    root = pathlib.Path(__file__).resolve().parents[2]
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    errors = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(errors) == 23
    assert "structured: features in tiles of" in result.stderr  # the split path, sharded
    assert max(errors.values()) <= 1e-5, errors
