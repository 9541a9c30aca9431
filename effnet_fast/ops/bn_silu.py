"""Differentiable BatchNorm + SiLU on top of a backend's kernels, for the outputs of the
stem, expand and head convs of the fused model (effnet_fast.nn.batch_norm.bn_silu applies
it to an nn.BatchNorm2d).

Forward: training mode computes the batch statistics with one read of y, then
normalises + SiLU in a second pass (eval mode folds the running statistics: one
pass). Backward saves only y and per-channel vectors and recomputes the
pre-activation instead of storing it:
  pass 1  per-channel sums of dz and dz * (y - mean)        (dz = grad * silu'(z))
  pass 2  grad_y = a * dz + b * y + c.
"""
import torch

from .backends import ALL_DTYPES, kernels
from .batch_norm import affine_grads, batch_stats, fold_statistics, grad_coefficients, input_grad_sums, local_count
from .common import acc_dtype, memory_format_of, refuse_double_backward

LAYER = "FusedConvBNAct (op effnet_fast::bn_silu)"

DTYPES = ALL_DTYPES  # each backend refuses the ones it does not run, naming its own


def check_inputs(y, bn_weight, bn_bias):
    """Raise a ValueError/TypeError naming what is wrong with y (N, C, H, W) and the
    BatchNorm weight and bias (C,)."""
    if y.dim() != 4:
        raise ValueError(f"bn_silu: expected a 4-D (N, C, H, W) input, got shape {tuple(y.shape)}")
    if y.dtype not in DTYPES:
        raise TypeError(f"bn_silu: unsupported dtype {y.dtype}; supported: {DTYPES}")
    c = y.shape[1]
    for name, t in (("bn_weight", bn_weight), ("bn_bias", bn_bias)):
        if t.device != y.device:
            raise ValueError(f"bn_silu: {name} is on {t.device}, input on {y.device}")
        if t.shape != (c,):
            raise ValueError(f"bn_silu: input has {c} channels but the BatchNorm {name} has shape {tuple(t.shape)}")


@torch.library.custom_op("effnet_fast::bn_silu", mutates_args=())
def bn_silu_op(y: torch.Tensor, bn_weight: torch.Tensor, bn_bias: torch.Tensor, running_mean: torch.Tensor,
               running_var: torch.Tensor, training: bool, eps: float, backend: str,
               group: str = "") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (silu(bn(y)), mean, biased var, count) where mean/var are the batch
    statistics over `count` values per channel in training mode and copies of the
    running ones in eval mode. `group`: the name of a process group whose ranks merge
    their batch statistics (synchronised BatchNorm), "" for none."""
    k = kernels(backend)
    if training:
        mean, var, count = batch_stats(*k.bn_silu_stats(y), local_count(y), group)
    else:
        acc = acc_dtype(y.dtype)
        mean, var = running_mean.to(acc, copy=True), running_var.to(acc, copy=True)
        count = mean.new_full((), local_count(y), dtype=torch.float64)
    _, scale, shift = fold_statistics(bn_weight, bn_bias, mean, var, eps)
    return k.bn_silu_forward(y, scale, shift), mean, var, count


@bn_silu_op.register_fake
def _(y, bn_weight, bn_bias, running_mean, running_var, training, eps, backend, group=""):
    acc = acc_dtype(y.dtype)
    c = y.shape[1]
    out = torch.empty_like(y, memory_format=memory_format_of(y))
    return out, y.new_empty((c,), dtype=acc), y.new_empty((c,), dtype=acc), y.new_empty((), dtype=torch.float64)


def _setup_context(ctx, inputs, output):
    y, bn_weight, bn_bias, _, _, training, eps, backend, *group = inputs
    _, mean, var, count = output
    ctx.save_for_backward(y, bn_weight, bn_bias, mean, var, count)
    ctx.training, ctx.eps, ctx.backend = training, eps, backend
    ctx.group = group[0] if group and training else ""


def _backward(ctx, grad_out, _grad_mean, _grad_var, _grad_count):
    refuse_double_backward(LAYER)
    y, bn_weight, bn_bias, mean, var, count = ctx.saved_tensors
    k = kernels(ctx.backend)
    grad_out = grad_out.contiguous(memory_format=memory_format_of(y))
    invstd, scale, shift = fold_statistics(bn_weight, bn_bias, mean, var, ctx.eps)
    sum_dz, sum_dz_ymu = k.bn_silu_backward_reduce(grad_out, y, scale, shift, mean)
    sums = input_grad_sums(sum_dz, sum_dz_ymu, count, local_count(y), ctx.group)
    coefs = grad_coefficients(scale, invstd, mean, *sums, ctx.training)
    grad_y = k.bn_silu_backward(grad_out, y, scale, shift, *coefs)
    grad_bn_weight, grad_bn_bias = affine_grads(invstd, sum_dz, sum_dz_ymu, bn_weight, bn_bias)
    return grad_y, grad_bn_weight, grad_bn_bias, None, None, None, None, None, None


torch.library.register_autograd("effnet_fast::bn_silu", _backward, setup_context=_setup_context)

