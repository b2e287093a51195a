import contextlib
import os
import subprocess
import sys

import jax
import pytest

# The suite mostly compiles small programs: on CPU, XLA's loop fusion emitters compile them about a third faster than
# its default MLIR emitters, with identical results (ntkcv.ntk.compilation.QUICK_CPU_OPTIONS). Set before JAX starts
# its backend, and inherited by the processes tests launch; an XLA_FLAGS that names the option keeps its choice.
if "xla_cpu_use_fusion_emitters" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_use_fusion_emitters=false".strip()
# The tests run in one process per core (pytest-xdist): on a GPU each takes memory as it needs it, not 75 % up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

# As in equinox's tests: no implicit float32/float64 or int/float mixes and no broadcasting over missing leading axes
# (write ``b[None]``), so the library works under the strictest settings a user may choose.
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "standard_dtype_promotion: run with JAX's standard dtype promotion, for third-party code that "
        "strict promotion refuses (optax's Adam raises a Python float to an int32 step count; flax's avg_pool "
        "divides by a NumPy integer)")
    config.addinivalue_line(
        "markers", "multiprocess: launches several local JAX processes under jax.distributed (CPU, gloo collectives)")


@pytest.fixture(autouse=True)
def _standard_dtype_promotion_where_marked(request):
    """Tests marked ``standard_dtype_promotion`` run with JAX's standard dtype promotion (rank promotion still
    raises)."""
    if request.node.get_closest_marker("standard_dtype_promotion") is None:
        yield
    else:
        with jax.numpy_dtype_promotion("standard"):
            yield


@pytest.fixture(params=["float32", "float64"])
def dtype(request):
    """Run a test in float32 (JAX's default) and in float64 (``jax_enable_x64`` on for the test only)."""
    if request.param == "float64":
        with jax.enable_x64(True):
            yield jax.numpy.float64
    else:
        yield jax.numpy.float32


@pytest.fixture(autouse=True)
def _jax_compilation_cache_restored():
    """Each test leaves JAX's persistent compilation cache as it found it (``ntkcv train`` turns it on process-wide;
    with it on, the monitor also uses its program store, and trace counts of later tests would change)."""
    from jax.experimental.compilation_cache import compilation_cache

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    previous = {name: getattr(jax.config, name) for name in names}
    yield
    if any(getattr(jax.config, name) != value for name, value in previous.items()):
        for name, value in previous.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()


@contextlib.contextmanager
def tmpfs(path, size: str):
    """A tmpfs of ``size`` (``mount -o size=``) mounted at ``path`` (made here) for the block, unmounted after;
    skips the test where that cannot be done (not root on Linux)."""
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root on Linux")
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                             text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=True)
