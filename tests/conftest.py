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
