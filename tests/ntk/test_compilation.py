"""Compile options for the programs a training run waits for: known to this XLA, CPU only, no change in results."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntkcv.ntk import compilation
from ntkcv.ntk.compilation import BACKGROUND_CPU_OPTIONS, QUICK_CPU_OPTIONS, quick_compile_options


@pytest.fixture
def fresh_probe():
    compilation._cpu_accepts.cache_clear()
    yield
    compilation._cpu_accepts.cache_clear()


def test_cpu_gets_the_quick_options_other_backends_none(fresh_probe):
    assert quick_compile_options("cpu") == QUICK_CPU_OPTIONS
    assert quick_compile_options("cpu", background=True) == {**QUICK_CPU_OPTIONS, **BACKGROUND_CPU_OPTIONS}
    assert quick_compile_options("gpu") == {} and quick_compile_options("tpu", background=True) == {}
    assert quick_compile_options() == (QUICK_CPU_OPTIONS if jax.default_backend() == "cpu" else {})


def test_options_this_xla_does_not_know_are_left_out(fresh_probe, monkeypatch):
    monkeypatch.setattr(compilation, "BACKGROUND_CPU_OPTIONS", {"xla_no_such_option_anywhere": True})
    assert quick_compile_options("cpu") == QUICK_CPU_OPTIONS
    assert quick_compile_options("cpu", background=True) == {}
    monkeypatch.setattr(compilation, "QUICK_CPU_OPTIONS", {"xla_no_such_option_anywhere": True})
    assert quick_compile_options("cpu") == {}


def test_quick_options_change_neither_the_result_nor_the_program():
    def f(w, x):
        h = jnp.tanh(x @ w)
        return jnp.linalg.eigvalsh(h @ h.T), jax.nn.softmax(h, axis=-1).sum(0)

    w = jax.random.normal(jax.random.key(0), (48, 32))
    x = jax.random.normal(jax.random.key(1), (64, 48))
    lowered = jax.jit(f).lower(w, x)
    default = lowered.compile(compiler_options={"xla_cpu_use_fusion_emitters": True})  # XLA default (see conftest)
    for background in (False, True):
        quick = lowered.compile(compiler_options=quick_compile_options("cpu", background=background))
        for a, b in zip(default(w, x), quick(w, x), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
        assert quick.cost_analysis()["flops"] == default.cost_analysis()["flops"]
