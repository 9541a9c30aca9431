"""Fake (meta) implementations of the kernel-level ops of csrc/op_schemas.h.

The backward of the differentiable ops calls the kernel ops directly, so tracing
it (torch.compile, AOT autograd, opcheck) needs their output shapes without
running a kernel. Registered once per op namespace: effnet_fast, or the
namespace of a test build of the same schemas. Each op also gets an autograd
registration that refuses a call needing a gradient.
"""
import torch

from .common import acc_dtype, conv_out_hw, memory_format_of

_registered = set()


def _per_channel(x):
    return x.new_empty((x.shape[1],), dtype=acc_dtype(x.dtype))


def _like(x, shape=None):
    out = x.new_empty(x.shape if shape is None else shape)
    return out.contiguous(memory_format=memory_format_of(x))


def refuse_autograd(op):
    """Kernel-level ops have no derivative: calling one on a tensor that requires grad
    raises (instead of autograd's warning and a missing gradient later)."""
    def refuse(ctx, inputs, output):
        raise RuntimeError(f"{op} is a kernel-level op and is not differentiable; call the differentiable ops "
                           f"(effnet_fast.ops: dwconv_bn_silu, squeeze_excite, ...) or run it under torch.no_grad()")

    def unreachable(ctx, *grads):
        raise AssertionError(f"{op}: backward of a refused call")

    torch.library.register_autograd(op, unreachable, setup_context=refuse)


def register_kernel_fakes(namespace="effnet_fast"):
    """Register the fake implementations for `namespace` (idempotent)."""
    if namespace in _registered:
        return
    _registered.add(namespace)

    def fake(name):
        refuse_autograd(f"{namespace}::{name}")
        return torch.library.register_fake(f"{namespace}::{name}")

    @fake("dwconv_bn_silu_stats")
    def _(x, weight, stride, padding=None):
        return _per_channel(x), _per_channel(x)

    @fake("dwconv_bn_silu_forward")
    def _(x, weight, scale, shift, stride, padding=None):
        n, c, h, w = x.shape
        return _like(x, (n, c, *conv_out_hw(h, w, weight.shape[-1], stride, padding)))

    @fake("dwconv_bn_silu_backward_reduce")
    def _(grad_out, x, weight, scale, shift, mean, stride, padding=None):
        return _per_channel(x), _per_channel(x)

    @fake("dwconv_bn_silu_backward")
    def _(grad_out, x, weight, scale, shift, coef_a, coef_b, coef_c, stride, padding=None):
        return _like(x), torch.empty_like(weight, memory_format=torch.contiguous_format)

    @fake("bn_silu_stats")
    def _(y):
        return _per_channel(y), _per_channel(y)

    @fake("bn_silu_forward")
    def _(y, scale, shift):
        return _like(y)

    @fake("bn_silu_backward_reduce")
    def _(grad_out, y, scale, shift, mean):
        return _per_channel(y), _per_channel(y)

    @fake("bn_silu_backward")
    def _(grad_out, y, scale, shift, coef_a, coef_b, coef_c):
        return _like(y)

    @fake("se_pool")
    def _(x):
        return x.new_empty(x.shape[:2], dtype=acc_dtype(x.dtype))

    @fake("se_scale")
    def _(x, gate, bias=None):
        return _like(x)

    @fake("se_gate_grad")
    def _(grad_out, x):
        return x.new_empty(x.shape[:2], dtype=acc_dtype(x.dtype))
