"""The kernel-level ops written with plain torch: the specification every backend
(C++ CPU, CUDA, Triton) is tested against. Signatures match csrc/op_schemas.h."""
import torch
import torch.nn.functional as F

from .common import acc_dtype, memory_format_of


def _conv(x, weight, stride):
    k = weight.shape[-1]
    acc = acc_dtype(x.dtype)
    return F.conv2d(x.to(acc), weight.to(acc), stride=stride, padding=k // 2, groups=x.shape[1])


def _channel(v):
    return v.view(1, -1, 1, 1)


def _silu_grad(z):
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def _like_x(t, x):
    return t.to(x.dtype).contiguous(memory_format=memory_format_of(x))


def dwconv_bn_silu_stats(x, weight, stride):
    y = _conv(x, weight, stride)
    var, mean = torch.var_mean(y, dim=(0, 2, 3), unbiased=False)
    return mean, var


def dwconv_bn_silu_forward(x, weight, scale, shift, stride):
    z = _conv(x, weight, stride) * _channel(scale) + _channel(shift)
    return _like_x(F.silu(z), x)


def dwconv_bn_silu_backward_reduce(grad_out, x, weight, scale, shift, mean, stride):
    y = _conv(x, weight, stride)
    dz = grad_out.to(y.dtype) * _silu_grad(y * _channel(scale) + _channel(shift))
    return dz.sum(dim=(0, 2, 3)), (dz * (y - _channel(mean))).sum(dim=(0, 2, 3))


def dwconv_bn_silu_backward(grad_out, x, weight, scale, shift, coef_a, coef_b, coef_c, stride):
    acc = acc_dtype(x.dtype)
    xa, wa = x.to(acc), weight.to(acc)
    k = weight.shape[-1]
    y = _conv(x, weight, stride)
    dz = grad_out.to(acc) * _silu_grad(y * _channel(scale) + _channel(shift))
    dy = _channel(coef_a) * dz + _channel(coef_b) * y + _channel(coef_c)
    groups = x.shape[1]
    grad_x = torch.nn.grad.conv2d_input(xa.shape, wa, dy, stride=stride, padding=k // 2, groups=groups)
    grad_w = torch.nn.grad.conv2d_weight(xa, wa.shape, dy, stride=stride, padding=k // 2, groups=groups)
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
