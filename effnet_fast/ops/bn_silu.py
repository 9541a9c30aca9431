"""BatchNorm + SiLU that keeps only its input for backward (memory-efficient SiLU):
the normalised pre-activation is recomputed in backward instead of being stored.
Plain torch ops, so it runs on every device; used after the 1x1 convs of the fused model."""
import torch
import torch.nn.functional as F


class _BNSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, weight, bias, running_mean, running_var, training, momentum, eps):
        z, mean, invstd = torch.native_batch_norm(y, weight, bias, running_mean, running_var, training,
                                                  momentum, eps)
        if not training:  # eval: normalise with the running statistics
            mean, invstd = running_mean.clone(), torch.rsqrt(running_var + eps)
        ctx.save_for_backward(y, weight, bias, mean, invstd)
        ctx.training, ctx.eps = training, eps
        return F.silu(z)

    @staticmethod
    def backward(ctx, grad_out):
        y, weight, bias, mean, invstd = ctx.saved_tensors
        shape = (1, -1) + (1,) * (y.dim() - 2)
        scale = (weight * invstd).view(shape)
        z = y * scale + (bias - mean * weight * invstd).view(shape)
        sig = torch.sigmoid(z)
        dz = grad_out * sig * (1 + z * (1 - sig))
        dims = [0] + list(range(2, y.dim()))
        xhat = (y - mean.view(shape)) * invstd.view(shape)
        grad_bias = dz.sum(dims)
        grad_weight = (dz * xhat).sum(dims)
        if ctx.training:
            count = y.numel() // y.shape[1]
            grad_y = scale * (dz - (grad_bias / count).view(shape) - xhat * (grad_weight / count).view(shape))
        else:
            grad_y = dz * scale
        return grad_y, grad_weight, grad_bias, None, None, None, None, None


def bn_silu(y, bn):
    """silu(bn(y)) for an nn.BatchNorm2d `bn`, with nn.BatchNorm2d's training semantics."""
    training = bn.training or bn.running_mean is None
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            momentum = 1.0 / float(bn.num_batches_tracked)
    return _BNSiLU.apply(y, bn.weight, bn.bias, bn.running_mean, bn.running_var, training, momentum, bn.eps)
