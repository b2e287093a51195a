"""Several processes under ``jax.distributed`` (local CPU processes, gloo collectives) give one process's kernels,
matrix-free estimates and monitor CVs, on every process, and only process 0 writes to its sinks."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

pytestmark = pytest.mark.multiprocess

SCRIPT = r"""
import json, sys
process, processes, port, devices, out = *map(int, sys.argv[1:5]), sys.argv[5]
import jax
jax.config.update("jax_num_cpu_devices", devices)
if processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=processes, process_id=process,
                               initialization_timeout=60)
import flax.linen as nn, jax.numpy as jnp, numpy as np, ntkcv
from ntkcv.cv.estimators import trace_hutchinson
assert len(jax.devices()) == processes * devices


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(jnp.tanh(nn.Dense(8)(x)))


def kernels(params, x1, x2):  # in one program (one compilation), a small budget: several tiles per device
    results = {}
    for impl, trace_axes, second in [("jacobian", (-1,), x2), ("jacobian", (), None), ("structured", (-1,), None),
                                     ("structured", (), x2)]:
        fn = ntkcv.ntk_fn(module.apply, trace_axes=trace_axes, implementation=impl, memory_budget=4_000)
        results[f"{impl}{trace_axes}{second is None}"] = fn(params, x1, second)
    results["diagonal"] = ntkcv.ntk_fn(module.apply, trace_axes=(), diagonal=True, memory_budget=4_000)(params, x1)
    groups = ntkcv.ntk_fn(module.apply, implementation="structured", groups="layers", memory_budget=4_000)
    results.update({f"group/{name}": kernel for name, kernel in groups(params, x1, x2).items()})
    op = ntkcv.ntk_operator(module.apply, params, x1, chunk_size=2)
    results["hutchinson"], results["hutchinson_stderr"] = trace_hutchinson(op.matvec, jax.random.key(3), n=op.dim,
                                                                           num_probes=8)
    return results


module = MLP()
rng = np.random.default_rng(0)  # NumPy: the same on every process, no eager JAX
x1, x2 = rng.normal(size=(10, 6)).astype(np.float32), rng.normal(size=(7, 6)).astype(np.float32)
params = jax.tree_util.tree_map(lambda leaf: rng.normal(size=leaf.shape).astype(np.float32),
                                jax.eval_shape(module.init, jax.random.key(0), x1))
results = jax.jit(kernels)(params, x1, x2)
gathered = ntkcv.ntk_fn(module.apply, trace_axes=(), implementation="jacobian")(params, x1)
sharded_fn = ntkcv.ntk_fn(module.apply, trace_axes=(), implementation="jacobian", gather=False)
sharded = sharded_fn(params, x1[:8])
shards = [(shard.index[0].indices(8), np.asarray(shard.data)) for shard in sharded.addressable_shards]
try:  # 10 rows on 4 devices
    sharded_fn(params, x1)
    uneven = None
except ValueError as error:
    uneven = str(error)
results["gathered"] = gathered


class Recording(ntkcv.sinks.Sink):
    calls = 0
    def write_scalars(self, step, scalars): self.calls += 1
    def write_arrays(self, step, arrays): self.calls += 1
    def write_hparams(self, hparams, metrics=None): self.calls += 1
    def flush(self): pass
    def close(self): pass


sink = Recording()
with ntkcv.NTKMonitor(module.apply, probes=x1, cvs=("entropy", "trace", "kernel_velocity"),
                      schedule=ntkcv.Schedule(every_steps=1), sinks=[sink]) as monitor:
    for step in range(2):
        written = monitor(step, jax.tree_util.tree_map(lambda p: p * (1 + step / 10), params), loss=1.0)
results.update({f"monitor/{name}": value for name, value in written.items()})
np.savez(f"{out}/{process}.npz", **{name: np.asarray(value) for name, value in results.items()})
with open(f"{out}/{process}.json", "w") as file:
    json.dump({"addressable": jax.tree_util.tree_all(jax.tree_util.tree_map(lambda k: k.is_fully_addressable,
                                                                            gathered)),
               "rows": sorted({row for (start, stop, _), _ in shards for row in range(start, stop)}),
               "shard_error": max(float(np.max(np.abs(data - np.asarray(gathered)[start:stop, :8])))
                                  for (start, stop, _), data in shards),
               "sink_calls": sink.calls, "uneven": uneven}, file)
"""

# processes x devices per process; 1x2: one process, two devices, without jax.distributed
CONFIGURATIONS = {"1x1": (1, 1), "1x2": (1, 2), "4x1": (4, 1), "2x2": (2, 2)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every configuration's processes, launched together; per configuration the ``(arrays, facts)`` of each
    process."""
    root = pathlib.Path(__file__).resolve().parents[2]
    env = {**os.environ, "JAX_PLATFORMS": "cpu",  # quicker CPU compiles (see ntkcv.ntk.compilation)
           "XLA_FLAGS": "--xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1"}
    launched = {}
    for name, (processes, devices) in CONFIGURATIONS.items():
        out, port = tmp_path_factory.mktemp(name), _free_port()
        procs = []
        for i in range(processes):
            with (out / f"{i}.log").open("w") as log:  # the child keeps its own handle
                procs.append(subprocess.Popen(
                    [sys.executable, "-c", SCRIPT, str(i), str(processes), str(port), str(devices), str(out)],
                    cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=log))
        launched[name] = out, procs
    deadline, failures = time.monotonic() + 300, []  # a hung collective fails the test instead of blocking CI
    try:
        for name, (out, procs) in launched.items():
            for i, proc in enumerate(procs):
                if proc.wait(timeout=max(1.0, deadline - time.monotonic())):
                    failures.append(f"{name} process {i} exited {proc.returncode}:\n"
                                    f"{(out / f'{i}.log').read_text()[-3000:]}")
    finally:
        for _, procs in launched.values():
            for proc in procs:
                proc.kill()
    assert not failures, "\n".join(failures)
    return {name: [(dict(np.load(out / f"{i}.npz")), json.loads((out / f"{i}.json").read_text()))
                   for i in range(len(procs))] for name, (out, procs) in launched.items()}


@pytest.mark.parametrize("configuration", ["1x2", "4x1", "2x2"])
def test_every_process_gets_the_single_process_results(runs, configuration):
    (expected, _), = runs["1x1"]
    assert len(expected) == 14
    for arrays, facts in runs[configuration]:
        assert arrays.keys() == expected.keys()
        for name, value in expected.items():
            np.testing.assert_allclose(arrays[name], value, rtol=1e-5, atol=1e-6 * np.max(np.abs(value)), err_msg=name)
        assert facts["addressable"]


@pytest.mark.parametrize("configuration", ["1x2", "4x1", "2x2"])
def test_a_kernel_kept_sharded_splits_its_rows_over_the_processes(runs, configuration):
    rows = [facts["rows"] for _, facts in runs[configuration]]
    assert sorted(row for held in rows for row in held) == list(range(8))  # each row on one process
    assert all(len(held) == 8 // len(rows) for held in rows)
    assert max(facts["shard_error"] for _, facts in runs[configuration]) <= 1e-5
    uneven = {facts["uneven"] for _, facts in runs[configuration]}
    assert uneven == ({"gather=False splits the rows over the 4 devices, so their number must be a multiple of 4; got "
                       "10 rows"} if configuration in ("4x1", "2x2") else {None})


@pytest.mark.parametrize("configuration", list(CONFIGURATIONS))
def test_only_process_zero_writes_to_its_sinks(runs, configuration):
    calls = [facts["sink_calls"] for _, facts in runs[configuration]]
    assert calls[0] == 4 and not any(calls[1:])  # two firings: scalars and the spectrum
