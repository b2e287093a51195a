"""The core/adapter split: ``ntkcv.ntk`` and ``ntkcv.cv`` import no framework, and layers reach the structured
path only through the interception protocol (which a framework other than Flax can implement too)."""

import ast
import contextlib
import contextvars
import pathlib

import jax
import jax.numpy as jnp
import pytest

import ntkcv
from ntkcv.ntk import LayerCall, interception, register_layer_interceptor, structured
from ntkcv.ntk.layout import canonical_fn, output_layout
from tests.ntk.models import reference_kernel, relative_error

PACKAGE = pathlib.Path(ntkcv.__file__).resolve().parent
CORE = ("ntk", "cv")
FRAMEWORKS = ("flax", "h5py", "tensorboardX")


def imported_names(source: str, package: str) -> set[str]:
    """Every module (and ``module.name`` of a from-import) that ``source``, a module of ``package``, imports anywhere
    (inside functions too), relative imports resolved; ``importlib.import_module``/``__import__`` of a literal too."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
              in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant)):
            found.add(node.args[0].value)
    return found


def forbidden(name: str) -> bool:
    """A framework, or a part of ntkcv outside the core (the adapters ``ntkcv.models`` and ``ntkcv.layers``, …)."""
    top = name.split(".")[0]
    if top == "ntkcv":
        return not any(name.startswith(f"ntkcv.{part}.") or name == f"ntkcv.{part}" for part in CORE)
    return top in FRAMEWORKS


def test_the_import_scanner_finds_every_kind_of_import():
    source = """
import jax
from ntkcv.ntk import jacobian
from . import groups

def lazy():
    import flax.linen as nn
    from flax import nnx
    from ..models import LayerCall
    from ntkcv import layers
    importlib.import_module("h5py")
"""
    names = imported_names(source, "ntkcv.ntk")
    assert {"jax", "ntkcv.ntk.jacobian", "ntkcv.ntk.groups", "flax.linen", "flax.nnx", "ntkcv.models.LayerCall",
            "ntkcv.layers", "h5py"} <= names
    assert sorted(n for n in names if forbidden(n)) == ["flax.linen", "flax.nnx", "h5py", "ntkcv.layers",
                                                         "ntkcv.models.LayerCall"]


@pytest.mark.parametrize("part", CORE)
def test_the_core_imports_no_framework_and_no_adapter(part):
    files = sorted((PACKAGE / part).rglob("*.py"))
    assert files
    offending = {}
    for file in files:
        package = ".".join(("ntkcv",) + file.relative_to(PACKAGE).parent.parts)
        names = sorted(n for n in imported_names(file.read_text(), package) if forbidden(n))
        if names:
            offending[str(file.relative_to(PACKAGE))] = names
    assert offending == {}


# A toy framework outside Flax: ``dense(name, params, x)`` layers, recognised through the protocol.
_TOY = contextvars.ContextVar("toy_visitor", default=None)


def _dense(name, params, x):
    w, b = params[name]["w"], params[name]["b"]
    visitor = _TOY.get()
    if visitor is None:
        return x @ w + b[None]
    describe = lambda: LayerCall("dense", ((x.ndim - 1,), 1), {"kernel": w, "bias": b}, x)  # noqa: E731
    return visitor.visit(f"toy/{name}", describe, lambda: x @ w + b[None])


@contextlib.contextmanager
def _toy_layers(visitor):
    token = _TOY.set(visitor)
    try:
        yield
    finally:
        _TOY.reset(token)


def test_a_registered_interceptor_lets_the_structured_path_factorise_another_frameworks_layers(monkeypatch):
    monkeypatch.setattr(interception, "_INTERCEPTORS", list(interception._INTERCEPTORS))  # restored afterwards
    keys = jax.random.split(jax.random.key(0), 6)
    with jax.enable_x64(True):
        params = {"hidden": {"w": jax.random.normal(keys[0], (4, 5), jnp.float64), "b": jnp.ones(5, jnp.float64)},
                  "out": {"w": jax.random.normal(keys[1], (5, 3), jnp.float64), "b": jnp.zeros(3, jnp.float64)}}
        x1, x2 = jax.random.normal(keys[2], (6, 4), jnp.float64), jax.random.normal(keys[3], (2, 4), jnp.float64)

        def apply_fn(p, x):
            return _dense("out", p, jnp.tanh(_dense("hidden", p, x)))

        f = canonical_fn(apply_fn, output_layout(apply_fn, params, x1, (-1,)))
        assert structured.coverage(f, params, x1).layers == ()  # not recognised: every leaf falls back
        assert register_layer_interceptor(_toy_layers) is _toy_layers
        register_layer_interceptor(_toy_layers)  # twice: once
        assert interception._INTERCEPTORS.count(_toy_layers) == 1
        cover = structured.coverage(f, params, x1)
        assert [layer.key for layer in cover.layers] == ["toy/hidden", "toy/out"] and cover.fallback == ()
        kernel = ntkcv.ntk_fn(apply_fn, implementation="structured")(params, x1, x2)
        assert relative_error(kernel, reference_kernel(apply_fn, params, x1, x2, (-1,))) <= 1e-10
