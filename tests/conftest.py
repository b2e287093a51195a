import contextlib
import os
import subprocess
import sys

import jax
import pytest


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
