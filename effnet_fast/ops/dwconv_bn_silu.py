"""Differentiable depthwise conv + BatchNorm + SiLU, on top of a backend's kernels.

Forward: training mode computes the batch statistics of the conv output with one
kernel, then normalises + SiLU with a second pass that recomputes the conv (eval
mode folds the running statistics and makes one pass). Backward saves only x, the
weights and per-channel vectors and recomputes the conv output:
  pass 1  per-channel sums of dz and dz * (y - mean)        (dz = grad * silu'(z))
  pass 2  dy = a * dz + b * y + c, then grad_x and grad_weight of the conv.
The conv pads k // 2 zeros on every side, or `padding` = (top, bottom, left, right),
each side at most k // 2 (TF 'same' padding: kernels.layout.tf_same_padding_2d).
"""
from typing import Optional

import torch

from .backends import ALL_DTYPES, kernels
from .batch_norm import affine_grads, batch_stats, fold_statistics, grad_coefficients, input_grad_sums, local_count
from .common import acc_dtype, as_supported_layout, autocast_weight, conv_out_hw, memory_format_of
from .common import autocast_input, check_batch_stats, refuse_double_backward, refuse_unsupported_transforms

LAYER = "FusedDWConvBNSiLU (op effnet_fast::dwconv_bn_silu)"
KERNEL_SIZES = (3, 5)
STRIDES = (1, 2)
DTYPES = ALL_DTYPES  # each backend refuses the ones it does not run, naming its own


def check_inputs(x, weight, bn_weight, bn_bias, stride, padding=None):
    """Raise a ValueError/TypeError naming what is wrong with x (N, C, H, W), the
    depthwise weight (C, 1, k, k), the BatchNorm weight and bias (C,), the stride and
    the padding."""
    if x.dim() != 4:
        raise ValueError(f"dwconv_bn_silu: expected a 4-D (N, C, H, W) input, got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    if weight.dim() != 4 or weight.shape[0] != c or weight.shape[1] != 1 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"dwconv_bn_silu: input has {c} channels but the depthwise weight has shape "
                         f"{tuple(weight.shape)}; expected ({c}, 1, k, k)")
    k = weight.shape[-1]
    if k not in KERNEL_SIZES:
        raise ValueError(f"dwconv_bn_silu: unsupported kernel size {k}; supported: {KERNEL_SIZES}")
    if stride not in STRIDES:
        raise ValueError(f"dwconv_bn_silu: unsupported stride {stride}; supported: {STRIDES}")
    if x.numel() == 0:
        raise ValueError(f"dwconv_bn_silu: empty input of shape {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise TypeError(f"dwconv_bn_silu: unsupported dtype {x.dtype}; supported: {DTYPES}")
    if weight.dtype != x.dtype:
        raise TypeError(f"dwconv_bn_silu: weight dtype {weight.dtype} differs from input dtype {x.dtype}")
    for name, t in (("weight", weight), ("bn_weight", bn_weight), ("bn_bias", bn_bias)):
        if t.device != x.device:
            raise ValueError(f"dwconv_bn_silu: {name} is on {t.device}, input on {x.device}")
    if bn_weight.shape != (c,) or bn_bias.shape != (c,):
        raise ValueError(f"dwconv_bn_silu: BatchNorm weight and bias must have shape ({c},)")
    check_padding(padding, k, h, w, stride)


def check_padding(padding, k, h, w, stride):
    """padding: None, or (top, bottom, left, right) ints in [0, k // 2] leaving an output."""
    if padding is None:
        return
    if len(padding) != 4 or not all(isinstance(p, int) and 0 <= p <= k // 2 for p in padding):
        raise ValueError(f"dwconv_bn_silu: padding must be (top, bottom, left, right), each an int in "
                         f"[0, k // 2 = {k // 2}], got {padding!r}")
    if min(conv_out_hw(h, w, k, stride, padding)) < 1:
        raise ValueError(f"dwconv_bn_silu: a {h}x{w} input padded by {tuple(padding)} is smaller than the "
                         f"{k}x{k} kernel")


@torch.library.custom_op("effnet_fast::dwconv_bn_silu", mutates_args=())
def dwconv_bn_silu(x: torch.Tensor, weight: torch.Tensor, bn_weight: torch.Tensor, bn_bias: torch.Tensor,
                   running_mean: torch.Tensor, running_var: torch.Tensor, training: bool, eps: float,
                   stride: int, backend: str, group: str = "",
                   padding: Optional[list[int]] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (silu(bn(dwconv(x))), mean, biased var, count) where mean/var are the
    batch statistics over `count` values per channel in training mode and copies of
    the running ones in eval mode. `group`: the name of a process group whose ranks
    merge their batch statistics (synchronised BatchNorm), "" for none. `padding`:
    (top, bottom, left, right), None for k // 2 on every side."""
    k = kernels(backend)
    acc = acc_dtype(x.dtype)
    oh, ow = conv_out_hw(x.shape[2], x.shape[3], weight.shape[-1], stride, padding)
    out_count = x.shape[0] * oh * ow
    if training:
        mean, var, count = batch_stats(*k.dwconv_bn_silu_stats(x, weight, stride, padding), out_count, group)
    else:
        mean, var = running_mean.to(acc, copy=True), running_var.to(acc, copy=True)
        count = mean.new_full((), out_count, dtype=torch.float64)
    _, scale, shift = fold_statistics(bn_weight, bn_bias, mean, var, eps)
    return k.dwconv_bn_silu_forward(x, weight, scale, shift, stride, padding), mean, var, count


@dwconv_bn_silu.register_fake
def _(x, weight, bn_weight, bn_bias, running_mean, running_var, training, eps, stride, backend, group="",
      padding=None):
    n, c, h, w = x.shape
    out = x.new_empty((n, c, *conv_out_hw(h, w, weight.shape[-1], stride, padding)))
    out = out.contiguous(memory_format=memory_format_of(x))
    acc = acc_dtype(x.dtype)
    return out, x.new_empty((c,), dtype=acc), x.new_empty((c,), dtype=acc), x.new_empty((), dtype=torch.float64)


def _setup_context(ctx, inputs, output):
    x, weight, bn_weight, bn_bias, _, _, training, eps, stride, backend, *optional = inputs
    group = optional[0] if len(optional) > 0 else ""
    padding = optional[1] if len(optional) > 1 else None
    _, mean, var, count = output
    ctx.save_for_backward(x, weight, bn_weight, bn_bias, mean, var, count)
    ctx.training, ctx.eps, ctx.stride, ctx.backend, ctx.padding = training, eps, stride, backend, padding
    ctx.group = group if training else ""


def _backward(ctx, grad_out, _grad_mean, _grad_var, _grad_count):
    refuse_double_backward(LAYER)
    x, weight, bn_weight, bn_bias, mean, var, count = ctx.saved_tensors
    k = kernels(ctx.backend)
    grad_out = grad_out.contiguous(memory_format=memory_format_of(x))
    invstd, scale, shift = fold_statistics(bn_weight, bn_bias, mean, var, ctx.eps)
    sum_dz, sum_dz_xmu = k.dwconv_bn_silu_backward_reduce(grad_out, x, weight, scale, shift, mean, ctx.stride,
                                                          ctx.padding)
    sums = input_grad_sums(sum_dz, sum_dz_xmu, count, local_count(grad_out), ctx.group)
    coefs = grad_coefficients(scale, invstd, mean, *sums, ctx.training)
    grad_x, grad_weight = k.dwconv_bn_silu_backward(grad_out, x, weight, scale, shift, *coefs, ctx.stride,
                                                    ctx.padding)
    grad_bn_weight, grad_bn_bias = affine_grads(invstd, sum_dz, sum_dz_xmu, bn_weight, bn_bias)
    return grad_x, grad_weight, grad_bn_weight, grad_bn_bias, None, None, None, None, None, None, None, None


torch.library.register_autograd("effnet_fast::dwconv_bn_silu", _backward, setup_context=_setup_context)


def dwconv_bn_silu_fn(x, weight, bn_weight, bn_bias, running_mean, running_var, training, eps, stride, backend,
                      group="", padding=None):
    """silu(batch_norm(depthwise_conv(x))) by the op effnet_fast::dwconv_bn_silu, after
    checking the inputs (a clear error for each wrong shape, dtype, device, kernel size
    or stride) and bringing x to a supported layout.

    Args:
        x: (N, C, H, W), NCHW or channels_last (other strides are copied), float32/64,
            bfloat16 or float16 as the backend allows; under autocast, float32 x and
            weight are cast to the autocast dtype.
        weight: (C, 1, k, k) depthwise weight, k in KERNEL_SIZES, x's dtype.
        bn_weight, bn_bias: (C,) BatchNorm affine parameters (float32, or float64 for float64 x).
        running_mean, running_var: (C,) running statistics (read in eval mode; empty tensors
            when `training` is True and there are none).
        training: normalise with the batch statistics (True) or the running ones.
        eps: BatchNorm eps; stride: 1 or 2; backend: a backend name.
        group: the name of a process group merging the batch statistics, "" for none.
        padding: (top, bottom, left, right) zeros around x, each in [0, k // 2]; None
            pads k // 2 on every side. TF 'same' padding (asymmetric for stride 2 and
            even sizes) is `effnet_fast.ops.common.tf_same_padding_2d(H, W, k, stride)`.

    Returns:
        (out, mean, var, count): out (N, C, H_out, W_out) in x's dtype and memory format;
        mean and biased var (C,) in float32 (float64 for float64 x): the batch statistics
        in training, copies of the running ones in eval; count: a float64 scalar tensor,
        the values per channel behind them (over every rank when synchronised).
    """
    refuse_unsupported_transforms(LAYER, x)
    x = autocast_input(x)
    weight = autocast_weight(weight, x)
    padding = None if padding is None else list(padding)  # the op's schema takes a list
    check_inputs(x, weight, bn_weight, bn_bias, stride, padding)
    if training and not group:  # synchronised: one value per rank suffices, as nn.SyncBatchNorm
        out_hw = conv_out_hw(x.shape[2], x.shape[3], weight.shape[-1], stride, padding)
        check_batch_stats(LAYER, (x.shape[0], x.shape[1], *out_hw), eps)
    return dwconv_bn_silu(as_supported_layout(x), weight.contiguous(), bn_weight, bn_bias,
                          running_mean, running_var, training, eps, stride, backend, group, padding)
