"""Empirical neural tangent kernels: the factory, its implementations and the matrix-free operator."""

from ntkcv.ntk.groups import parameter_groups
from ntkcv.ntk.interception import LayerCall, register_layer_interceptor
from ntkcv.ntk.kernel import Implementation, ntk_fn
from ntkcv.ntk.layout import flatten_kernel
from ntkcv.ntk.operator import NTKOperator, matvec_flops, ntk_operator

__all__ = ["Implementation", "LayerCall", "NTKOperator", "flatten_kernel", "matvec_flops", "ntk_fn", "ntk_operator",
           "parameter_groups", "register_layer_interceptor"]
