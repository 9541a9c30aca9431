"""Triton kernels for effnet_fast, shipped as effnet_fast.kernels.

Exports the kernel-level ops of csrc/op_schemas.h with the same signatures, as torch custom
ops (namespace effnet_fast_triton) so that graphs calling them can be traced. They run on
CUDA tensors, or on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1, set
before this module is imported). Imports nothing from effnet_fast: the package is the
bottom layer, loaded by effnet_fast.ops.backends."""
from .ops import (NAMESPACE, bn_silu_backward, bn_silu_backward_reduce, bn_silu_forward, bn_silu_stats,
                  dwconv_bn_silu_backward, dwconv_bn_silu_backward_reduce, dwconv_bn_silu_forward,
                  dwconv_bn_silu_stats, se_gate_grad, se_pool, se_scale)

__all__ = ["NAMESPACE", "dwconv_bn_silu_stats", "dwconv_bn_silu_forward", "dwconv_bn_silu_backward_reduce",
           "dwconv_bn_silu_backward", "bn_silu_stats", "bn_silu_forward", "bn_silu_backward_reduce",
           "bn_silu_backward", "se_pool", "se_scale", "se_gate_grad"]
