"""Traced programs kept on disk beside JAX's persistent compilation cache, so that a rerun skips tracing too.

JAX's persistent cache stores compiled executables, but a new process still traces and lowers the Python
function before it can look one up: for the monitor's program (the model traced several times by the NTK
planner, then the collective variables) that is 0.2–0.3 s per run. :func:`stored_program` serialises the
lowered program with :mod:`jax.export` under a key that names everything the program depends on; a later
process deserialises it (milliseconds), and its compilation is then a hit in JAX's own cache.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pathlib
import tempfile
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from ntkcv.ntk.tiling import default_memory_budget

logger = logging.getLogger("ntkcv.monitor")

STORE_NAME = "ntkcv-programs"  # subdirectory of JAX's compilation cache directory


@functools.cache
def _source_digest() -> str:
    """Digest of ntkcv's own source, so an edited ntkcv never reuses a program traced by the old code."""
    digest = hashlib.sha256()
    for path in sorted(pathlib.Path(__file__).parent.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def argument_signature(args: Any) -> tuple:
    """The tree structure of ``args`` and the shape and dtype of each leaf: what a traced program is specific to."""
    leaves, tree = jax.tree_util.tree_flatten(args)
    return tree, tuple((np.shape(leaf), str(getattr(leaf, "dtype", type(leaf)))) for leaf in leaves)


def program_key(model_fn: Callable, model_args: tuple, args: tuple, settings: dict[str, Any]) -> str:
    """A key for the program built from ``model_fn`` at ``args``: the jaxpr and constants of ``model_fn`` at
    ``model_args`` (the model's params and inputs), the argument tree and shapes, ``settings``, the JAX and ntkcv
    versions, the devices and the memory budget that the NTK's tiling planned for."""
    closed = jax.make_jaxpr(model_fn)(*model_args)
    tree, avals = argument_signature(args)
    parts = (str(closed.jaxpr), str(tree), repr(avals), repr(sorted(settings.items())),
             jax.__version__, _source_digest(), repr([d.device_kind for d in jax.local_devices()]),
             str(default_memory_budget()), str(jax.config.jax_default_matmul_precision))
    digest = hashlib.sha256("\0".join(parts).encode())
    for const in closed.consts:
        digest.update(np.asarray(const).tobytes())
    return digest.hexdigest()


def stored_program(fn: Callable, args: tuple, key: str, directory: str | os.PathLike | None = None,
                   compiler_options: dict[str, Any] | None = None) -> tuple[jax.stages.Wrapped, bool]:
    """``fn``'s program for ``args``, jitted with ``compiler_options`` (so ``.lower(*args).compile()`` compiles it
    ahead of a call), and whether it was loaded: deserialised from the store when there, else exported (traced)
    and stored. ``fn`` is a Python function or a ``jax.jit`` without compiler options (jax.export nests it in a jit).

    The store is ``directory`` (default: JAX's ``jax_compilation_cache_dir``) / ``ntkcv-programs``. Without one,
    and when the program cannot be exported, ``fn`` itself is jitted (traced as usual).
    """
    traced = jax.jit(fn, compiler_options=compiler_options)  # nothing is traced until it is lowered or called
    directory = directory or jax.config.jax_compilation_cache_dir
    if not directory:
        return traced, False
    path = pathlib.Path(directory) / STORE_NAME / f"{key}.jaxexport"
    leaves, tree = jax.tree_util.tree_flatten(args)  # exported over the leaves: any pytree (nnx.State too)
    try:
        exported = jax.export.deserialize(bytearray(path.read_bytes()))
        loaded = True
        logger.debug("monitor program loaded from %s", path)
    except FileNotFoundError:
        exported, loaded = None, False
    except Exception as error:  # a truncated or incompatible file: trace again and replace it
        logger.warning("ignoring the unreadable stored program %s (%s)", path, error)
        exported, loaded = None, False
    if exported is None:
        try:
            exported = jax.export.export(jax.jit(lambda *flat: fn(*jax.tree_util.tree_unflatten(tree, flat))))(*leaves)
            blob = exported.serialize()
        except Exception as error:  # e.g. a host callback or a custom call jax.export refuses
            logger.debug("monitor program not exportable (%s); traced in every run", error)
            return traced, False
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as file:
                file.write(blob)
            os.replace(file.name, path)  # atomic: concurrent runs never read half a file
        except OSError as error:
            logger.warning("could not store the monitor program in %s (%s)", path.parent, error)
    def exported_call(*call_args):
        return exported.call(*jax.tree_util.tree_leaves(call_args))

    return jax.jit(exported_call, compiler_options=compiler_options), loaded
