"""Which parameters a model reads only elementwise, and in which order it reads them, from the jaxpr of one sample's
forward pass.

A parameter ``p`` is read *elementwise* when every use of it is a layout operation (reshape, broadcast, transpose,
slice, pad, concatenation, dtype cast) or elementwise arithmetic, with constants or other parameters, until it meets
a value that depends on the sample in an elementwise operation or a concatenation. Norm scales and biases
(``y = n ⊙ γ + β``), biases added by hand, learned position embeddings, class tokens concatenated to the tokens
and layer scales are read elementwise; a matrix multiplied by hand, an embedding looked up by a gather or a weight
normalised by a reduction are not.

Such a ``p`` enters each position ``t`` of an activation through one element per feature, ``y_{tf} = φ(z_{tf},
p_f)``, so its per-sample gradient ``w_{aof} = Σ_t g_{aotf} ∂_p φ(z_{atf}, p_f)`` (``g``: the cotangents of ``y``)
has the size of ``p`` and its share of Θ is ``Σ_{r,f} w_{aorf} w_{bqrf}``: the backward pass forms ``w`` as a
reduction over positions, and a factorisation through ``y`` (its Gram over pairs of positions) would cost ``T²``
times more. The rule looks at how a parameter meets the sample, not at what follows: a contraction written by hand
as a broadcast product and a sum, ``(x * w).sum(-1)``, counts as elementwise (its per-sample gradient is exact, but
not then always the cheapest factor).
"""

from __future__ import annotations

from collections.abc import Sequence

from jax.extend.core import ClosedJaxpr, Jaxpr, JaxprEqn, Var, jaxprs_in_params

# primitives that act elementwise or only move elements (after broadcasting, operands have equal shapes)
_ELEMENTWISE = frozenset({
    "reshape", "broadcast_in_dim", "squeeze", "transpose", "slice", "rev", "pad", "concatenate", "convert_element_type",
    "copy", "copy_p", "add", "add_any", "sub", "mul", "div", "neg", "max", "min", "select_n", "exp", "log", "log1p",
    "tanh", "logistic", "sqrt", "rsqrt", "abs", "square", "integer_pow", "pow",
})
# primitives that call a jaxpr once on their own operands (looked into rather than treated as opaque)
_CALLS = frozenset({"jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call", "checkpoint",
                    "remat"})

_NONE: frozenset[int] = frozenset()


def non_elementwise_reads(jaxpr: ClosedJaxpr, params: Sequence[int], samples: Sequence[int]) -> dict[int, str]:
    """For each input ``params[k]`` of ``jaxpr`` that is not read elementwise, the primitive that first reads it
    otherwise (the inputs ``samples`` depend on the sample; all other inputs are constants)."""
    params, samples = set(params), set(samples)
    found: dict[int, str] = {}
    _walk(jaxpr.jaxpr, [frozenset({i}) if i in params else _NONE for i in range(len(jaxpr.jaxpr.invars))],
          [i in samples for i in range(len(jaxpr.jaxpr.invars))], found)
    return found


def read_order(jaxpr: ClosedJaxpr, inputs: Sequence[int]) -> list[int]:
    """The inputs numbered ``inputs`` in the order ``jaxpr`` first reads them, looking into called jaxprs (the order of
    a model's layers for its parameters); inputs never read come last, in their own order."""
    first: dict[int, int] = {}
    chosen = set(inputs)
    _first_reads(jaxpr.jaxpr, [frozenset({i}) if i in chosen else _NONE for i in range(len(jaxpr.jaxpr.invars))], first)
    return sorted(inputs, key=lambda i: first.get(i, len(first) + len(inputs)))


def _first_reads(jaxpr: Jaxpr, inputs_in: list[frozenset[int]], first: dict[int, int]) -> None:
    """Number in ``first`` (in program order) the first read of each input that arguments of ``jaxpr`` carry unchanged
    (``inputs_in``: which input each argument is)."""
    carried = {v: i for v, i in zip(jaxpr.invars, inputs_in, strict=True) if i}
    for eqn in jaxpr.eqns:
        read = [carried.get(v, _NONE) if isinstance(v, Var) else _NONE for v in eqn.invars]
        called = _called_jaxpr(eqn)
        if called is not None:  # what the call reads, not what it is passed
            _first_reads(called, read, first)
            continue
        for i in _NONE.union(*read):
            first.setdefault(i, len(first))


def _called_jaxpr(eqn: JaxprEqn) -> Jaxpr | None:
    if eqn.primitive.name not in _CALLS:
        return None
    jaxprs = list(jaxprs_in_params(eqn.params))
    if len(jaxprs) != 1 or len(jaxprs[0].invars) != len(eqn.invars):
        return None
    return jaxprs[0]


def _walk(jaxpr: Jaxpr, derived_in: list[frozenset[int]], sampled_in: list[bool],
          found: dict[int, str]) -> tuple[list[frozenset[int]], list[bool]]:
    """Propagate through ``jaxpr`` which parameters each value is an elementwise function of (``derived``, for
    values that do not depend on the sample) and whether it depends on the sample; record in ``found`` the
    parameters a primitive reads otherwise. Returns both for the outputs."""
    derived = {v: d for v, d in zip(jaxpr.invars, derived_in, strict=True) if d}
    sampled = {v for v, s in zip(jaxpr.invars, sampled_in, strict=True) if s}
    for eqn in jaxpr.eqns:
        d_in = [derived.get(v, _NONE) if isinstance(v, Var) else _NONE for v in eqn.invars]
        s_in = [isinstance(v, Var) and v in sampled for v in eqn.invars]
        called = _called_jaxpr(eqn)
        if called is not None:
            d_out, s_out = _walk(called, d_in, s_in, found)
        else:
            read, on_sample = _NONE.union(*d_in), any(s_in)
            if eqn.primitive.name not in _ELEMENTWISE:
                for i in read:
                    found.setdefault(i, eqn.primitive.name)
            # met the sample elementwise (or left through another primitive): no longer followed
            keep = read if eqn.primitive.name in _ELEMENTWISE and not on_sample else _NONE
            d_out, s_out = [keep] * len(eqn.outvars), [on_sample] * len(eqn.outvars)
        for v, d, s in zip(eqn.outvars, d_out, s_out, strict=True):
            if d:
                derived[v] = d
            if s:
                sampled.add(v)
    return ([derived.get(v, _NONE) if isinstance(v, Var) else _NONE for v in jaxpr.outvars],
            [isinstance(v, Var) and v in sampled for v in jaxpr.outvars])
