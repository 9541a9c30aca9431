"""BatchNorm algebra shared by the fused BN ops (dwconv_bn_silu, bn_silu): the fold of
the statistics into a per-channel scale and shift, and the backward coefficients."""
import torch


def fold(bn_weight, bn_bias, mean, var, eps):
    """(invstd, scale, shift) with bn(y) = y * scale + shift, in mean's dtype."""
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
