import jax
import pytest


@pytest.fixture(autouse=True, scope="module")
def _float64():
    """CV tests compare with float64 references (``numpy.linalg.eigvalsh``), so run them in float64."""
    with jax.enable_x64(True):
        yield
