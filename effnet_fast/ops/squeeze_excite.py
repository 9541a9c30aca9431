"""Differentiable squeeze-excitation on top of a backend's kernels:
out = x * sigmoid(fc2(silu(fc1(mean_hw(x))))).

The pool and the channel-wise scale are kernels (they touch every pixel); the two
tiny fully-connected layers stay in torch. Backward saves x and the pooled (N, C)
vector only: grad_x = grad * gate + dpool / (H * W), in one pass after one reduction.
"""
import torch
import torch.nn.functional as F

from .backends import kernels
from .common import acc_dtype, as_supported_layout, autocast_weight, memory_format_of
from .common import refuse_double_backward, refuse_unsupported_transforms

LAYER = "FusedSqueezeExcitation (op effnet_fast::squeeze_excite)"
LAYER_PROJECT = "FusedSqueezeExcitation + 1x1 projection (op effnet_fast::squeeze_excite_project)"


def check_inputs(x, w1, b1, w2, b2):
    """Raise a ValueError/TypeError naming what is wrong with x (N, C, H, W), fc1's weight
    (C_r, C, 1, 1) and bias (C_r,), fc2's weight (C, C_r, 1, 1) and bias (C,)."""
    if x.dim() != 4:
        raise ValueError(f"squeeze_excite: expected a 4-D (N, C, H, W) input, got shape {tuple(x.shape)}")
    c = x.shape[1]
    if w1.dim() != 4 or w1.shape[1] != c or w1.shape[2:] != (1, 1):
        raise ValueError(f"squeeze_excite: fc1 weight must be (C_reduced, {c}, 1, 1), got {tuple(w1.shape)}")
    if w2.shape != (c, w1.shape[0], 1, 1):
        raise ValueError(f"squeeze_excite: fc2 weight must be ({c}, {w1.shape[0]}, 1, 1), got {tuple(w2.shape)}")
    if x.numel() == 0:
        raise ValueError(f"squeeze_excite: empty input of shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"squeeze_excite: unsupported dtype {x.dtype}")
    for name, t in (("fc1 weight", w1), ("fc1 bias", b1), ("fc2 weight", w2), ("fc2 bias", b2)):
        if t.device != x.device:
            raise ValueError(f"squeeze_excite: {name} is on {t.device}, input on {x.device}")
        # As the reference convs: one dtype, except under autocast, which casts both.
        if t.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"squeeze_excite: {name} dtype {t.dtype} differs from input dtype {x.dtype}")


def _gate_parts(pooled, w1, b1, w2, b2):
    acc = pooled.dtype
    a1 = F.linear(pooled, w1.flatten(1).to(acc), b1.to(acc))
    s1 = F.silu(a1)
    gate = torch.sigmoid(F.linear(s1, w2.flatten(1).to(acc), b2.to(acc)))
    return a1, s1, gate


def se_gate(pooled, w1, b1, w2, b2):
    """sigmoid(fc2(silu(fc1(pooled)))): the (N, C) gate, in pooled's dtype."""
    return _gate_parts(pooled, w1, b1, w2, b2)[2]


@torch.library.custom_op("effnet_fast::squeeze_excite", mutates_args=())
def squeeze_excite(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                   backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out, pooled); pooled is the (N, C) mean kept for backward."""
    k = kernels(backend)
    pooled = k.se_pool(x)
    _, _, gate = _gate_parts(pooled, w1, b1, w2, b2)
    return k.se_scale(x, gate, None), pooled


@squeeze_excite.register_fake
def _(x, w1, b1, w2, b2, backend):
    out = torch.empty_like(x, memory_format=memory_format_of(x))
    return out, x.new_empty(x.shape[:2], dtype=acc_dtype(x.dtype))


def _setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, backend = inputs
    ctx.save_for_backward(x, w1, b1, w2, b2, output[1])
    ctx.backend = backend


def _se_backward(k, grad_scaled, x, w1, b1, w2, b2, pooled):
    """Gradients of (x, w1, b1, w2, b2) given the gradient of x * gate."""
    grad_scaled = grad_scaled.contiguous(memory_format=memory_format_of(x))
    a1, s1, gate = _gate_parts(pooled, w1, b1, w2, b2)
    grad_gate = k.se_gate_grad(grad_scaled, x)
    grad_a2 = grad_gate * gate * (1 - gate)
    sig1 = torch.sigmoid(a1)
    grad_a1 = (grad_a2 @ w2.flatten(1).to(gate.dtype)) * sig1 * (1 + a1 * (1 - sig1))
    grad_pooled = grad_a1 @ w1.flatten(1).to(gate.dtype)
    hw = x.shape[2] * x.shape[3]
    grad_x = k.se_scale(grad_scaled, gate, grad_pooled / hw)
    grad_w1 = (grad_a1.t() @ pooled).view_as(w1).to(w1.dtype)
    grad_w2 = (grad_a2.t() @ s1).view_as(w2).to(w2.dtype)
    return grad_x, grad_w1, grad_a1.sum(0).to(b1.dtype), grad_w2, grad_a2.sum(0).to(b2.dtype)


def _backward(ctx, grad_out, _grad_pooled):
    refuse_double_backward(LAYER)
    x, w1, b1, w2, b2, pooled = ctx.saved_tensors
    return _se_backward(kernels(ctx.backend), grad_out, x, w1, b1, w2, b2, pooled) + (None,)


torch.library.register_autograd("effnet_fast::squeeze_excite", _backward, setup_context=_setup_context)


@torch.library.custom_op("effnet_fast::squeeze_excite_project", mutates_args=())
def squeeze_excite_project(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                           b2: torch.Tensor, w_proj: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Squeeze-excitation followed by a 1x1 conv (no bias): (conv1x1(x * gate), pooled).
    x * gate is never kept: backward recomputes it, so the pair saves x alone."""
    k = kernels(backend)
    pooled = k.se_pool(x)
    _, _, gate = _gate_parts(pooled, w1, b1, w2, b2)
    return F.conv2d(k.se_scale(x, gate, None), w_proj), pooled


@squeeze_excite_project.register_fake
def _(x, w1, b1, w2, b2, w_proj, backend):
    n, _, h, w = x.shape
    out = x.new_empty((n, w_proj.shape[0], h, w)).contiguous(memory_format=memory_format_of(x))
    return out, x.new_empty(x.shape[:2], dtype=acc_dtype(x.dtype))


def _setup_context_project(ctx, inputs, output):
    x, w1, b1, w2, b2, w_proj, backend = inputs
    ctx.save_for_backward(x, w1, b1, w2, b2, w_proj, output[1])
    ctx.backend = backend


def _backward_project(ctx, grad_out, _grad_pooled):
    refuse_double_backward(LAYER_PROJECT)
    x, w1, b1, w2, b2, w_proj, pooled = ctx.saved_tensors
    k = kernels(ctx.backend)
    _, _, gate = _gate_parts(pooled, w1, b1, w2, b2)
    scaled = k.se_scale(x, gate, None)
    grad_scaled, grad_w_proj, _ = torch.ops.aten.convolution_backward(
        grad_out, scaled, w_proj, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, True, False])
    return _se_backward(k, grad_scaled, x, w1, b1, w2, b2, pooled) + (grad_w_proj, None)


torch.library.register_autograd("effnet_fast::squeeze_excite_project", _backward_project,
                                setup_context=_setup_context_project)


def squeeze_excite_fn(x, w1, b1, w2, b2, backend):
    """x * sigmoid(fc2(silu(fc1(mean_hw(x))))) by the op effnet_fast::squeeze_excite.

    Args:
        x: (N, C, H, W), NCHW or channels_last (other strides are copied), any floating dtype
            the backend runs.
        w1, b1: fc1, a 1x1 conv (C_r, C, 1, 1) with bias (C_r,); w2, b2: fc2, (C, C_r, 1, 1)
            and (C,); x's dtype (under autocast, any).
        backend: a backend name (see effnet_fast.ops.backends).

    Returns:
        (N, C, H, W) in x's dtype and memory format. The gate is computed in float32
        (float64 for float64 x). Backward keeps x and the (N, C) pooled mean only.
    """
    refuse_unsupported_transforms(LAYER, x)
    check_inputs(x, w1, b1, w2, b2)
    return squeeze_excite(as_supported_layout(x), w1, b1, w2, b2, backend)[0]


def squeeze_excite_project_fn(x, w1, b1, w2, b2, w_proj, backend):
    """conv1x1(squeeze_excite(x), w_proj) by the op effnet_fast::squeeze_excite_project: the
    block's projection after the gate, without keeping x * gate for backward.

    Args: as `squeeze_excite_fn`, and w_proj: (C_out, C, 1, 1), no bias.

    Returns:
        (N, C_out, H, W) in x's dtype (autocast's under autocast) and memory format.
    """
    refuse_unsupported_transforms(LAYER_PROJECT, x)
    w_proj = autocast_weight(w_proj, x)
    check_inputs(x, w1, b1, w2, b2)
    if w_proj.dim() != 4 or w_proj.shape[1:] != (x.shape[1], 1, 1):
        raise ValueError(f"squeeze_excite_project: projection weight must be (C_out, {x.shape[1]}, 1, 1), "
                         f"got {tuple(w_proj.shape)}")
    return squeeze_excite_project(as_supported_layout(x), w1, b1, w2, b2, w_proj, backend)[0]
