"""BatchNorm algebra shared by the fused BN ops (dwconv_bn_silu, bn_silu): the statistics
and affine parameters folded into a per-channel scale and shift, the backward
coefficients, and the collectives of synchronised BatchNorm."""
import torch

from .common import refuse_double_backward


def fold_statistics(bn_weight, bn_bias, mean, var, eps):
    """(invstd, scale, shift), each (C,) in mean's dtype, with bn(y) = y * scale + shift
    for BatchNorm weight and bias and the (batch or running) mean and biased var."""
    invstd = torch.rsqrt(var + eps)
    scale = bn_weight.to(mean.dtype) * invstd
    return invstd, scale, bn_bias.to(mean.dtype) - mean * scale


def grad_coefficients(scale, invstd, mean, sum_dz, sum_dz_xmu, count, training):
    """(a, b, c) with grad_y = a * dz + b * y + c, from the per-channel sums of dz and
    dz * (y - mean) over `count` values. In training the batch statistics depend on y:
    grad_y = scale * (dz - mean(dz) - xhat * mean(dz * xhat))."""
    if not training:
        return scale, torch.zeros_like(scale), torch.zeros_like(scale)
    coef_b = -scale * invstd * invstd * sum_dz_xmu / count
    coef_c = -scale * sum_dz / count - coef_b * mean
    return scale, coef_b, coef_c


def affine_grads(invstd, sum_dz, sum_dz_xmu, bn_weight, bn_bias):
    """Gradients of the BatchNorm weight and bias."""
    return (sum_dz_xmu * invstd).to(bn_weight.dtype), sum_dz.to(bn_bias.dtype)


# Synchronised BatchNorm (effnet_fast.distributed.convert_sync_batchnorm). The fused ops
# take the name of a process group (str, "" for none: custom ops cannot take a
# ProcessGroup) and merge the per-channel statistics over its ranks between the
# statistics and the apply kernels (forward), and the two per-channel sums between
# backward_reduce and backward (backward), as nn.SyncBatchNorm does.

def _process_group(name):
    from torch.distributed.distributed_c10d import _resolve_process_group  # torch.distributed may be absent
    return _resolve_process_group(name)


def merge_batch_stats(mean, var, count, group):
    """(mean, biased var, count) of the union of every rank's batch in process group
    `group`, from each rank's per-channel mean and biased var over `count` values:
    one all-gather of (count, mean, var), merged exactly (Chan et al.) in float64
    and returned in mean's dtype; the count as a float64 scalar tensor."""
    acc = mean.dtype
    c = mean.shape[0]
    local = torch.cat([mean.new_full((1,), count, dtype=torch.float64), mean.double(), var.double()])
    pg = _process_group(group)
    parts = [torch.empty_like(local) for _ in range(torch.distributed.get_world_size(pg))]
    torch.distributed.all_gather(parts, local, group=pg)
    every = torch.stack(parts)
    counts, means, variances = every[:, :1], every[:, 1:c + 1], every[:, c + 1:]
    total = counts.sum()
    merged_mean = (counts * means).sum(0) / total
    merged_var = (counts * (variances + (means - merged_mean).square())).sum(0) / total
    return merged_mean.to(acc), merged_var.to(acc), total


@torch.library.custom_op("effnet_fast::all_reduce_sum", mutates_args=())
def all_reduce_sum(t: torch.Tensor, group: str) -> torch.Tensor:
    """The sum of `t` over the ranks of process group `group`, as a new tensor (an op,
    so that a traced backward, e.g. under torch.compile, keeps the collective)."""
    out = t.clone()
    torch.distributed.all_reduce(out, group=_process_group(group))
    return out


@all_reduce_sum.register_fake
def _(t, group):
    return torch.empty_like(t)


def sync_sums(sum_dz, sum_dz_xmu, group):
    """The backward's per-channel sums over every rank of `group` (one all-reduce);
    `group` "" returns them unchanged."""
    if not group:
        return sum_dz, sum_dz_xmu
    both = all_reduce_sum(torch.stack([sum_dz, sum_dz_xmu]), group)
    return both[0], both[1]


def input_grad_sums(sum_dz, sum_dz_xmu, count, local, group):
    """(sum dz, sum dz * (y - mean), count) for the input gradient: over every rank of
    `group` (one all-reduce; `count` is then the merged count), or the local ones with
    `local` values per channel. The affine gradients always use the local sums."""
    if not group:
        return sum_dz, sum_dz_xmu, local
    return *sync_sums(sum_dz, sum_dz_xmu, group), count


def local_count(y):
    """Values per channel of an (N, C, H, W) tensor."""
    return y.numel() // y.shape[1]


def batch_stats(mean, var, count, group):
    """The statistics the BatchNorm normalises with: the local ones, or with `group`
    the merged ones; returns (mean, var, count as a float64 scalar tensor)."""
    if group:
        return merge_batch_stats(mean, var, count, group)
    return mean, var, mean.new_full((), count, dtype=torch.float64)


def _channel(v):
    return v.view(1, -1, 1, 1)


@torch.library.custom_op("effnet_fast::sync_batch_norm", mutates_args=())
def sync_batch_norm_op(y: torch.Tensor, bn_weight: torch.Tensor, bn_bias: torch.Tensor, eps: float,
                       group: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """BatchNorm in training mode with the batch statistics merged over process group
    `group`, for the BatchNorm without activation (the projection of an MBConv block).
    Returns (bn(y), mean, biased var, count), the statistics over every rank."""
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    var, mean = torch.var_mean(y.to(acc), dim=(0, 2, 3), unbiased=False)
    mean, var, count = batch_stats(mean, var, local_count(y), group)
    _, scale, shift = fold_statistics(bn_weight, bn_bias, mean, var, eps)
    return (y.to(acc) * _channel(scale) + _channel(shift)).to(y.dtype), mean, var, count


@sync_batch_norm_op.register_fake
def _(y, bn_weight, bn_bias, eps, group):
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    c = y.shape[1]
    return (torch.empty_like(y), y.new_empty((c,), dtype=acc), y.new_empty((c,), dtype=acc),
            y.new_empty((), dtype=torch.float64))


def _sync_bn_setup_context(ctx, inputs, output):
    y, bn_weight, bn_bias, eps, group = inputs
    _, mean, var, count = output
    ctx.save_for_backward(y, bn_weight, bn_bias, mean, var, count)
    ctx.eps, ctx.group = eps, group


def _sync_bn_backward(ctx, grad_out, _grad_mean, _grad_var, _grad_count):
    refuse_double_backward("the projection BatchNorm (op effnet_fast::sync_batch_norm)")
    y, bn_weight, bn_bias, mean, var, count = ctx.saved_tensors
    acc = mean.dtype
    invstd, scale, _ = fold_statistics(bn_weight, bn_bias, mean, var, ctx.eps)
    g, ya = grad_out.to(acc), y.to(acc)
    sum_dz = g.sum(dim=(0, 2, 3))
    sum_dz_xmu = (g * (ya - _channel(mean))).sum(dim=(0, 2, 3))
    all_dz, all_dz_xmu = sync_sums(sum_dz, sum_dz_xmu, ctx.group)
    a, b, c = grad_coefficients(scale, invstd, mean, all_dz, all_dz_xmu, count, True)
    grad_y = (g * _channel(a) + ya * _channel(b) + _channel(c)).to(y.dtype)
    grad_weight, grad_bias = affine_grads(invstd, sum_dz, sum_dz_xmu, bn_weight, bn_bias)  # local, as DDP averages
    return grad_y, grad_weight, grad_bias, None, None


torch.library.register_autograd("effnet_fast::sync_batch_norm", _sync_bn_backward,
                                setup_context=_sync_bn_setup_context)
