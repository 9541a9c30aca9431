"""The Triton launchers registered as torch custom ops (namespace effnet_fast_triton),
with fake implementations: the differentiable ops call them from their backward, which
torch.compile and AOT autograd trace with fake tensors, where a raw Triton launch cannot run."""
from typing import Optional

import torch
from torch import Tensor

from effnet_fast.ops.common import memory_format_of

from . import dwconv_bn_silu as _dw
from . import squeeze_excite as _se

_NS = "effnet_fast_triton"


def _out_size(size, k, stride):
    return (size + 2 * (k // 2) - k) // stride + 1


def _channel_vectors(x, count):
    return tuple(x.new_empty(x.shape[1], dtype=torch.float32) for _ in range(count))


def _like(x, shape, dtype=None):
    return torch.empty(shape, dtype=dtype or x.dtype, device=x.device, memory_format=memory_format_of(x))


@torch.library.custom_op(f"{_NS}::dwconv_bn_silu_stats", mutates_args=())
def dwconv_bn_silu_stats(x: Tensor, weight: Tensor, stride: int) -> tuple[Tensor, Tensor]:
    return _dw.dwconv_bn_silu_stats(x, weight, stride)


@dwconv_bn_silu_stats.register_fake
def _(x, weight, stride):
    return _channel_vectors(x, 2)


@torch.library.custom_op(f"{_NS}::dwconv_bn_silu_forward", mutates_args=())
def dwconv_bn_silu_forward(x: Tensor, weight: Tensor, scale: Tensor, shift: Tensor, stride: int) -> Tensor:
    return _dw.dwconv_bn_silu_forward(x, weight, scale, shift, stride)


@dwconv_bn_silu_forward.register_fake
def _(x, weight, scale, shift, stride):
    n, c, h, w = x.shape
    k = weight.shape[-1]
    return _like(x, (n, c, _out_size(h, k, stride), _out_size(w, k, stride)))


@torch.library.custom_op(f"{_NS}::dwconv_bn_silu_backward_reduce", mutates_args=())
def dwconv_bn_silu_backward_reduce(grad_out: Tensor, x: Tensor, weight: Tensor, scale: Tensor, shift: Tensor,
                                   mean: Tensor, stride: int) -> tuple[Tensor, Tensor]:
    return _dw.dwconv_bn_silu_backward_reduce(grad_out, x, weight, scale, shift, mean, stride)


@dwconv_bn_silu_backward_reduce.register_fake
def _(grad_out, x, weight, scale, shift, mean, stride):
    return _channel_vectors(x, 2)


@torch.library.custom_op(f"{_NS}::dwconv_bn_silu_backward", mutates_args=())
def dwconv_bn_silu_backward(grad_out: Tensor, x: Tensor, weight: Tensor, scale: Tensor, shift: Tensor,
                            coef_a: Tensor, coef_b: Tensor, coef_c: Tensor, stride: int) -> tuple[Tensor, Tensor]:
    return _dw.dwconv_bn_silu_backward(grad_out, x, weight, scale, shift, coef_a, coef_b, coef_c, stride)


@dwconv_bn_silu_backward.register_fake
def _(grad_out, x, weight, scale, shift, coef_a, coef_b, coef_c, stride):
    return _like(x, x.shape), torch.empty_like(weight, memory_format=torch.contiguous_format)


@torch.library.custom_op(f"{_NS}::se_pool", mutates_args=())
def se_pool(x: Tensor) -> Tensor:
    return _se.se_pool(x)


@se_pool.register_fake
def _(x):
    return x.new_empty(x.shape[:2], dtype=torch.float32)


@torch.library.custom_op(f"{_NS}::se_scale", mutates_args=())
def se_scale(x: Tensor, gate: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    return _se.se_scale(x, gate, bias)


@se_scale.register_fake
def _(x, gate, bias=None):
    return _like(x, x.shape)


@torch.library.custom_op(f"{_NS}::se_gate_grad", mutates_args=())
def se_gate_grad(grad_out: Tensor, x: Tensor) -> Tensor:
    return _se.se_gate_grad(grad_out, x)


@se_gate_grad.register_fake
def _(grad_out, x):
    return x.new_empty(x.shape[:2], dtype=torch.float32)
