"""How the structured NTK sees a model's layers: a small protocol that framework adapters implement.

:mod:`ntkcv.ntk.structured` runs the model inside :func:`intercepting` with a :class:`LayerVisitor`. Every
registered *layer interceptor* (a context-manager factory, see :func:`register_layer_interceptor`) routes
the calls of the layers it recognises to ``visitor.visit(key, describe, call)``:

- ``key`` names the layer instance, the same string in every trace of the model (``linen/Dense_0``);
- ``describe()`` returns the call as a :class:`LayerCall` when it is one the structured path
  factorises, else an :class:`Unfactorised` (or a plain string) saying why it is not;
- ``call()`` runs the layer; ``visit`` returns its output, or a replacement for it.

The core knows no framework: Flax's linen and NNX layers and equinox's layers are recognised by
:mod:`ntkcv.layers`, which registers its interceptor when ``ntkcv`` is imported. Layers no interceptor recognises
take the exact Jacobian contraction, leaf by leaf.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, Protocol

import jax


class LayerCall(NamedTuple):
    """One call of a linear layer ``y = u W (+ b)`` that the structured NTK factorises.

    - ``kind="dense"``: ``config = (axes, n_features)``: the input axes contracted with the kernel (non-negative,
      sorted) and the number of trailing feature axes of ``y``.
    - ``kind="conv"``: ``config = (kernel_size, strides, padding, input_dilation, kernel_dilation)``, as
      ``jax.lax.conv_general_dilated`` takes them (padding also ``"CIRCULAR"``, ``"REFLECT"``, ``"CAUSAL"``);
      channels last (inputs and outputs), ungrouped.
    - The kernel's layout is free (Flax: ``(…, d_in, h)``, equinox: ``(h, d_in, …)``): the kernel depends only on
      the inputs and the output cotangents.
    - ``kind="embed"``: ``config = ()``; ``inputs`` are integer ids, ``y = params["embedding"][inputs]``.

    ``params`` maps roles (``"kernel"``, ``"bias"``, ``"embedding"``) to the arrays the call reads, which must be
    leaves of the ``params`` the model was given (otherwise the layer is not factorised).
    """

    kind: str
    config: tuple
    params: dict[str, jax.Array]
    inputs: jax.Array


class Unfactorised(NamedTuple):
    """A recognised layer call the structured NTK does not factorise: why, and the arrays it reads (so that they are
    reported as falling back for that reason; a plain string as ``describe()``'s result names no arrays)."""

    reason: str
    params: tuple[jax.Array, ...]


class LayerVisitor(Protocol):
    """What the structured path does with each recognised layer call."""

    def visit(self, key: str, describe: Callable[[], LayerCall | Unfactorised | str],
              call: Callable[[], jax.Array]) -> jax.Array:
        """Run (``call()``) and inspect one layer call; return its output or a replacement."""
        ...


LayerInterceptor = Callable[[LayerVisitor], contextlib.AbstractContextManager[Any]]

_INTERCEPTORS: list[LayerInterceptor] = []


def register_layer_interceptor(interceptor: LayerInterceptor) -> LayerInterceptor:
    """Make every structured kernel enter ``interceptor(visitor)`` while it traces the model (registering twice
    is a no-op). Returns ``interceptor``, so it can be used as a decorator."""
    if interceptor not in _INTERCEPTORS:
        _INTERCEPTORS.append(interceptor)
    return interceptor


@contextlib.contextmanager
def intercepting(visitor: LayerVisitor) -> Iterator[LayerVisitor]:
    """Route the recognised layer calls of models traced in this context to ``visitor``."""
    with contextlib.ExitStack() as stack:
        for interceptor in _INTERCEPTORS:
            stack.enter_context(interceptor(visitor))
        yield visitor
