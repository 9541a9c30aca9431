"""The Triton launchers registered as torch custom ops (namespace effnet_fast_triton): the
differentiable ops call them from their backward, which torch.compile and AOT autograd
trace with fake tensors, where a raw Triton launch cannot run. Their fake implementations
are the other backends' (effnet_fast.ops.kernel_fakes), registered by the backend registry
when it loads this package."""
from typing import Optional

import torch
from torch import Tensor

from . import bn_silu as _bn
from . import dwconv_bn_silu as _dw
from . import squeeze_excite as _se

NAMESPACE = "effnet_fast_triton"
_NS = NAMESPACE


@torch.library.custom_op(f"{_NS}::dwconv_bn_silu_stats", mutates_args=())
def dwconv_bn_silu_stats(x: Tensor, weight: Tensor, stride: int,
                         padding: Optional[list[int]] = None) -> tuple[Tensor, Tensor]:
    return _dw.dwconv_bn_silu_stats(x, weight, stride, padding)


@torch.library.custom_op(f"{_NS}::dwconv_bn_silu_forward", mutates_args=())
def dwconv_bn_silu_forward(x: Tensor, weight: Tensor, scale: Tensor, shift: Tensor, stride: int,
                           padding: Optional[list[int]] = None) -> Tensor:
    return _dw.dwconv_bn_silu_forward(x, weight, scale, shift, stride, padding)


@torch.library.custom_op(f"{_NS}::dwconv_bn_silu_backward_reduce", mutates_args=())
def dwconv_bn_silu_backward_reduce(grad_out: Tensor, x: Tensor, weight: Tensor, scale: Tensor, shift: Tensor,
                                   mean: Tensor, stride: int,
                                   padding: Optional[list[int]] = None) -> tuple[Tensor, Tensor]:
    return _dw.dwconv_bn_silu_backward_reduce(grad_out, x, weight, scale, shift, mean, stride, padding)


@torch.library.custom_op(f"{_NS}::dwconv_bn_silu_backward", mutates_args=())
def dwconv_bn_silu_backward(grad_out: Tensor, x: Tensor, weight: Tensor, scale: Tensor, shift: Tensor,
                            coef_a: Tensor, coef_b: Tensor, coef_c: Tensor, stride: int,
                            padding: Optional[list[int]] = None) -> tuple[Tensor, Tensor]:
    return _dw.dwconv_bn_silu_backward(grad_out, x, weight, scale, shift, coef_a, coef_b, coef_c, stride, padding)


@torch.library.custom_op(f"{_NS}::bn_silu_stats", mutates_args=())
def bn_silu_stats(y: Tensor) -> tuple[Tensor, Tensor]:
    return _bn.bn_silu_stats(y)


@torch.library.custom_op(f"{_NS}::bn_silu_forward", mutates_args=())
def bn_silu_forward(y: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    return _bn.bn_silu_forward(y, scale, shift)


@torch.library.custom_op(f"{_NS}::bn_silu_backward_reduce", mutates_args=())
def bn_silu_backward_reduce(grad_out: Tensor, y: Tensor, scale: Tensor, shift: Tensor,
                            mean: Tensor) -> tuple[Tensor, Tensor]:
    return _bn.bn_silu_backward_reduce(grad_out, y, scale, shift, mean)


@torch.library.custom_op(f"{_NS}::bn_silu_backward", mutates_args=())
def bn_silu_backward(grad_out: Tensor, y: Tensor, scale: Tensor, shift: Tensor, coef_a: Tensor, coef_b: Tensor,
                     coef_c: Tensor) -> Tensor:
    return _bn.bn_silu_backward(grad_out, y, scale, shift, coef_a, coef_b, coef_c)


@torch.library.custom_op(f"{_NS}::se_pool", mutates_args=())
def se_pool(x: Tensor) -> Tensor:
    return _se.se_pool(x)


@torch.library.custom_op(f"{_NS}::se_scale", mutates_args=())
def se_scale(x: Tensor, gate: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    return _se.se_scale(x, gate, bias)


@torch.library.custom_op(f"{_NS}::se_gate_grad", mutates_args=())
def se_gate_grad(grad_out: Tensor, x: Tensor) -> Tensor:
    return _se.se_gate_grad(grad_out, x)

