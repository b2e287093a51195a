"""The monitor's program store: keys that change with everything a program depends on, loads that skip tracing."""

import contextlib
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental.compilation_cache import compilation_cache

import ntkcv
from ntkcv._program_store import STORE_NAME, program_key, stored_program
from ntkcv.cv import collective_variables

PARAMS = {"w": jnp.ones((3, 4)), "v": jnp.ones((4, 2))}
X = jnp.arange(15.0).reshape(5, 3) / 10


def model(p, x):
    return jnp.tanh(x @ p["w"]) @ p["v"]


@contextlib.contextmanager
def jax_cache_dir(path):
    """JAX's compilation cache directory set to ``path`` inside the block only."""
    previous = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", path)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        jax.config.update("jax_compilation_cache_dir", previous)
        compilation_cache.reset_cache()


def _counting_kernel():
    traces = []

    def kernel(params, x):
        traces.append(1)
        return ntkcv.ntk_fn(model, warn=False)(params, x)

    return jax.jit(kernel), traces


def test_key_changes_with_the_model_its_constants_shapes_and_settings():
    def key_of(model_fn, args, settings):
        return program_key(model_fn, args, args, settings)

    key = key_of(model, (PARAMS, X), {"cvs": ("entropy",)})
    assert key == key_of(lambda p, x: jnp.tanh(x @ p["w"]) @ p["v"], (PARAMS, X), {"cvs": ("entropy",)})
    assert key != key_of(lambda p, x: jnp.sin(x @ p["w"]) @ p["v"], (PARAMS, X), {"cvs": ("entropy",)})
    assert key != key_of(model, (PARAMS, X[:4]), {"cvs": ("entropy",)})
    assert key != key_of(model, (PARAMS, X), {"cvs": ("trace",)})
    assert key != key_of(model, ({"v": PARAMS["v"], "w": PARAMS["w"][None]}, X[None]), {"cvs": ("entropy",)})
    assert key != program_key(model, (PARAMS, X), (PARAMS, X, X), {"cvs": ("entropy",)})  # more arguments
    shift = [np.zeros(4, np.float32), np.ones(4, np.float32)]  # closed-over constants with equal shapes
    keys = {key_of(lambda p, x, s=s: jnp.tanh(x @ p["w"] + s[None]) @ p["v"], (PARAMS, X), {}) for s in shift}
    assert len(keys) == 2


def test_a_stored_program_is_loaded_without_tracing(tmp_path):
    jitted, traces = _counting_kernel()
    first, loaded = stored_program(jitted, (PARAMS, X), "k", tmp_path)
    assert not loaded and traces == [1]
    assert [p.name for p in (tmp_path / STORE_NAME).iterdir()] == ["k.jaxexport"]
    again, fresh_traces = _counting_kernel()
    second, loaded = stored_program(again, (PARAMS, X), "k", tmp_path)
    assert loaded and fresh_traces == []
    expected = ntkcv.ntk_fn(model)(PARAMS, X)
    np.testing.assert_allclose(first(PARAMS, X), expected, rtol=1e-6)
    np.testing.assert_allclose(second(PARAMS, X), expected, rtol=1e-6)
    assert fresh_traces == []


def test_without_a_directory_or_with_a_broken_file_the_program_is_traced(tmp_path, caplog):
    jitted, traces = _counting_kernel()
    with jax_cache_dir(None):
        program, loaded = stored_program(jitted, (PARAMS, X), "k")
        assert not loaded and not (tmp_path / STORE_NAME).exists()
        np.testing.assert_allclose(program(PARAMS, X), ntkcv.ntk_fn(model)(PARAMS, X), rtol=1e-6)
    jitted, traces = _counting_kernel()
    (tmp_path / STORE_NAME).mkdir()
    (tmp_path / STORE_NAME / "k.jaxexport").write_bytes(b"truncated")
    with caplog.at_level(logging.WARNING, logger="ntkcv.monitor"):
        program, loaded = stored_program(jitted, (PARAMS, X), "k", tmp_path)
    assert not loaded and "unreadable stored program" in caplog.text and traces == [1]
    np.testing.assert_allclose(program(PARAMS, X), ntkcv.ntk_fn(model)(PARAMS, X), rtol=1e-6)
    assert stored_program(_counting_kernel()[0], (PARAMS, X), "k", tmp_path)[1]  # the broken file was replaced


class TwoLayers(nnx.Module):
    def __init__(self):
        rngs = nnx.Rngs(0)
        self.hidden, self.out = nnx.Linear(3, 8, rngs=rngs), nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.hidden(x)))


@pytest.mark.parametrize("kind", ["function", "nnx", "matrix_free"])
def test_a_monitor_loads_the_program_an_earlier_monitor_stored(tmp_path, kind):
    """Also for parameters that jax.export cannot serialise as a tree (nnx.State), and for the estimators."""
    labels = jnp.array([0, 1, 0, 1, 1])
    model_, params = (model, PARAMS) if kind != "nnx" else (lambda m: (m, m.params))(ntkcv.from_nnx(TwoLayers()))
    cvs = ("entropy", "trace") if kind == "matrix_free" else ("entropy", "trace", "target_alignment")
    options = {"matrix_free": True, "num_probes": 4, "num_matvecs": 4} if kind == "matrix_free" else {}
    values, stored = [], []
    with jax_cache_dir(str(tmp_path)):
        for _ in range(2):
            monitor = ntkcv.NTKMonitor(model_, X, labels=labels, cvs=cvs, **options)
            values.append(monitor(0, params))
            assert monitor.trace_count == 1
            stored.append([(p.name, p.stat().st_ino, p.stat().st_mtime_ns) for p in (tmp_path / STORE_NAME).iterdir()])
    assert len(stored[0]) == 1 and stored[1] == stored[0]  # the second monitor read the program, wrote nothing
    expected = ntkcv.NTKMonitor(model_, X, labels=labels, cvs=cvs, **options)(0, params)  # outside this store
    assert set(values[1]) == set(expected)
    for got in values:
        for name, value in expected.items():
            np.testing.assert_allclose(got[name], value, rtol=1e-5)
    if kind == "function":  # and the traced program itself is exact
        reference = collective_variables(ntkcv.ntk_fn(model)(PARAMS, X), cvs, labels=labels)
        for name, value in reference.items():
            np.testing.assert_allclose(values[1][f"cv/{name}"], value, rtol=1e-5)
