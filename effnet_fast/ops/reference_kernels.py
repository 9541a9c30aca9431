"""The kernel-level ops written with plain torch: the specification every backend
(C++ CPU, CUDA, Triton) is tested against. Signatures match csrc/op_schemas.h; the
depthwise conv's `padding` is (top, bottom, left, right), None for k // 2 on every side."""
import torch
import torch.nn.functional as F

from .common import acc_dtype, memory_format_of


def _padded(x, weight, padding):
    """x in the accumulation dtype with the conv's zero padding around it."""
    top, bottom, left, right = (weight.shape[-1] // 2,) * 4 if padding is None else padding
    return F.pad(x.to(acc_dtype(x.dtype)), (left, right, top, bottom))


def _conv(x, weight, stride, padding):
    return F.conv2d(_padded(x, weight, padding), weight.to(acc_dtype(x.dtype)), stride=stride, groups=x.shape[1])


def _channel(v):
    return v.view(1, -1, 1, 1)


def _silu_grad(z):
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def _like_x(t, x):
    return t.to(x.dtype).contiguous(memory_format=memory_format_of(x))


def dwconv_bn_silu_stats(x, weight, stride, padding=None):
    y = _conv(x, weight, stride, padding)
    var, mean = torch.var_mean(y, dim=(0, 2, 3), unbiased=False)
    return mean, var


def dwconv_bn_silu_forward(x, weight, scale, shift, stride, padding=None):
    z = _conv(x, weight, stride, padding) * _channel(scale) + _channel(shift)
    return _like_x(F.silu(z), x)


def dwconv_bn_silu_backward_reduce(grad_out, x, weight, scale, shift, mean, stride, padding=None):
    y = _conv(x, weight, stride, padding)
    dz = grad_out.to(y.dtype) * _silu_grad(y * _channel(scale) + _channel(shift))
    return dz.sum(dim=(0, 2, 3)), (dz * (y - _channel(mean))).sum(dim=(0, 2, 3))


def dwconv_bn_silu_backward(grad_out, x, weight, scale, shift, coef_a, coef_b, coef_c, stride, padding=None):
    acc = acc_dtype(x.dtype)
    xp, wa = _padded(x, weight, padding), weight.to(acc)
    y = F.conv2d(xp, wa, stride=stride, groups=x.shape[1])
    dz = grad_out.to(acc) * _silu_grad(y * _channel(scale) + _channel(shift))
    dy = _channel(coef_a) * dz + _channel(coef_b) * y + _channel(coef_c)
    groups = x.shape[1]
    grad_xp = torch.nn.grad.conv2d_input(xp.shape, wa, dy, stride=stride, groups=groups)
    grad_w = torch.nn.grad.conv2d_weight(xp, wa.shape, dy, stride=stride, groups=groups)
    top, left = (weight.shape[-1] // 2,) * 2 if padding is None else (padding[0], padding[2])
    grad_x = grad_xp[:, :, top:top + x.shape[2], left:left + x.shape[3]]
    return _like_x(grad_x, x), grad_w.to(weight.dtype)


def se_pool(x):
    return x.to(acc_dtype(x.dtype)).mean(dim=(2, 3))


def se_scale(x, gate, bias=None):
    out = x.to(gate.dtype) * gate[:, :, None, None]
    if bias is not None:
        out = out + bias[:, :, None, None]
    return _like_x(out, x)


def se_gate_grad(grad_out, x):
    acc = acc_dtype(x.dtype)
    return (grad_out.to(acc) * x.to(acc)).sum(dim=(2, 3))


def _bn_silu_z(y, scale, shift):
    ya = y.to(acc_dtype(y.dtype))
    return ya, ya * _channel(scale) + _channel(shift)


def bn_silu_stats(y):
    var, mean = torch.var_mean(y.to(acc_dtype(y.dtype)), dim=(0, 2, 3), unbiased=False)
    return mean, var


def bn_silu_forward(y, scale, shift):
    return _like_x(F.silu(_bn_silu_z(y, scale, shift)[1]), y)


def bn_silu_backward_reduce(grad_out, y, scale, shift, mean):
    ya, z = _bn_silu_z(y, scale, shift)
    dz = grad_out.to(ya.dtype) * _silu_grad(z)
    return dz.sum(dim=(0, 2, 3)), (dz * (ya - _channel(mean))).sum(dim=(0, 2, 3))


def bn_silu_backward(grad_out, y, scale, shift, coef_a, coef_b, coef_c):
    ya, z = _bn_silu_z(y, scale, shift)
    dz = grad_out.to(ya.dtype) * _silu_grad(z)
    return _like_x(_channel(coef_a) * dz + _channel(coef_b) * ya + _channel(coef_c), y)
