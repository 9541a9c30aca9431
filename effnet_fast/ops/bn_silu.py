"""BatchNorm + SiLU that keeps only its input for backward (memory-efficient SiLU):
the normalised pre-activation is recomputed in backward instead of being stored.
Plain torch ops, so it runs on every device; used after the 1x1 convs of the fused model."""
import torch
import torch.nn.functional as F

from .common import check_batch_stats, refuse_double_backward, refuse_unsupported_transforms

LAYER = "FusedConvBNAct (fused BatchNorm + SiLU after a conv)"


class _BNSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, weight, bias, running_mean, running_var, training, momentum, eps):
        z, save_mean, save_invstd = torch.native_batch_norm(y, weight, bias, running_mean, running_var, training,
                                                            momentum, eps)
        # Batch statistics in training; in eval copies of the running ones, which a
        # later training step may update in place before this backward runs.
        stats = (save_mean, save_invstd) if training else (running_mean.clone(), running_var.clone())
        ctx.save_for_backward(y, weight, bias, *stats)
        ctx.training, ctx.eps = training, eps
        return F.silu(z)

    @staticmethod
    def backward(ctx, grad_out):
        refuse_double_backward(LAYER)
        y, weight, bias, stat_a, stat_b = ctx.saved_tensors
        eps = ctx.eps
        if ctx.training:  # stat_a, stat_b = batch mean, 1 / sqrt(var + eps)
            running, saved = (None, None), (stat_a, stat_b)
            z = torch.native_batch_norm(y, weight, bias, stat_a, stat_b.pow(-2) - eps, False, 0.0, eps)[0]
        else:  # running mean and variance
            running, saved = (stat_a, stat_b), (None, None)
            z = torch.native_batch_norm(y, weight, bias, stat_a, stat_b, False, 0.0, eps)[0]
        grad_z = torch.ops.aten.silu_backward(grad_out, z)
        grad_y, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
            grad_z, y, weight, *running, *saved, ctx.training, eps, [True, True, True])
        return grad_y, grad_weight, grad_bias, None, None, None, None, None


def bn_silu(y, bn):
    """silu(bn(y)) for an nn.BatchNorm2d `bn`, with nn.BatchNorm2d's training semantics."""
    if y.numel() == 0:
        return F.silu(bn(y))  # an empty batch (or plane): exactly as the reference
    refuse_unsupported_transforms(LAYER, y)
    if y.dim() != 4:
        raise ValueError(f"{LAYER}: expected a 4-D (N, C, H, W) input, got shape {tuple(y.shape)}")
    training = bn.training or bn.running_mean is None
    if training:
        check_batch_stats(LAYER, y.shape, bn.eps)
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            momentum = 1.0 / float(bn.num_batches_tracked)
    return _BNSiLU.apply(y, bn.weight, bn.bias, bn.running_mean, bn.running_var, training, momentum, bn.eps)
