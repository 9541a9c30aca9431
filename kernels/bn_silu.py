"""BatchNorm + SiLU in Triton: statistics, forward, and the two backward passes.

The reductions (statistics, backward sums) work on tiles of BLOCK_P pixels (flattened
over N, H, W) by BLOCK_C channels and read y through its strides, so NCHW and
channels_last share one code path with per-layout configs. They run in two levels, as
in dwconv_bn_silu.py: a program reduces the tiles of one pixel group into float32
partials, and a small kernel merges the groups in a fixed order (deterministic).
The elementwise passes (forward, backward) run over y's storage order, flat.
"""
import torch
import triton
import triton.language as tl

from ._common import (INTERPRET, autotuned, check_supported, empty_like_layout, group_tile_range, num_groups,
                      shape_generic_jit, sum_rows)
from .layout import as_supported_layout, is_channels_last, memory_format_of
from .dwconv_bn_silu import _load_channel, _merge_stats_kernel, _merge_tile, _tile_channels

_REDUCE_KEY = ["C", "HW"]
_NCHW_CONFIGS = [triton.Config({"BLOCK_P": 1024, "BLOCK_C": 1}, num_warps=4),
                 triton.Config({"BLOCK_P": 2048, "BLOCK_C": 1}, num_warps=8),
                 triton.Config({"BLOCK_P": 256, "BLOCK_C": 4}, num_warps=4)]
_NHWC_CONFIGS = [triton.Config({"BLOCK_P": 32, "BLOCK_C": 64}, num_warps=4),
                 triton.Config({"BLOCK_P": 64, "BLOCK_C": 64}, num_warps=8),
                 triton.Config({"BLOCK_P": 16, "BLOCK_C": 128}, num_warps=4)]
# Under the interpreter: small tiles, so the small test shapes still span several tiles,
# pixel groups and channel blocks.
_REDUCE_INTERP = triton.Config({"BLOCK_P": 64, "BLOCK_C": 8})
_FLAT_KEY = ["numel", "C", "HW", "CHANNELS_LAST"]
_FLAT_CONFIGS = [triton.Config({"BLOCK": 2048}, num_warps=8), triton.Config({"BLOCK": 1024}, num_warps=4)]
_FLAT_INTERP = triton.Config({"BLOCK": 1024})


def _per_layout(kernel):
    """(NCHW-tuned, channels_last-tuned) variants of a reduction kernel."""
    return (autotuned(_NCHW_CONFIGS, _REDUCE_INTERP, _REDUCE_KEY)(kernel),
            autotuned(_NHWC_CONFIGS, _REDUCE_INTERP, _REDUCE_KEY)(kernel))


@triton.jit
def _tile_offsets(tile, c, P, HW, syn, syc, syp, BLOCK_P: tl.constexpr):
    """Offsets of a tile of pixels [tile * BLOCK_P, +BLOCK_P) by channels c, and which pixels exist.
    Pixel p is (n, q) = divmod(p, HW); q's offset is q * syp (H*W has one stride in both layouts)."""
    p = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    offs = ((p // HW) * syn + (p % HW) * syp)[:, None] + (c * syc)[None, :]
    return offs, p < P


# ----------------------------------------------------------------------------- reductions

@shape_generic_jit
def _stats_kernel(y_ptr, count_ptr, mean_ptr, m2_ptr, C, HW, P, groups, syn, syc, syp,
                  BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per group and channel: pixel count, mean and M2 of y. Values are taken relative to
    the group's first pixel (a common offset does not cancel; a constant input gives its
    exact mean), each tile is reduced exactly (two passes in registers), tiles merge by
    Chan's formula."""
    start, end = group_tile_range(P, groups, BLOCK_P)
    c, c_ok, c_in = _tile_channels(C, BLOCK_C)
    first, first_ok = _tile_offsets(start * BLOCK_P, c_in, P, HW, syn, syc, syp, 1)
    shift = tl.sum(tl.load(y_ptr + first, mask=first_ok[:, None], other=0.0).to(tl.float32), 0)
    count = 0.0
    mean = tl.zeros((BLOCK_C,), tl.float32)
    m2 = tl.zeros((BLOCK_C,), tl.float32)
    for tile in range(start, end):
        offs, p_ok = _tile_offsets(tile, c_in, P, HW, syn, syc, syp, BLOCK_P)
        y = tl.load(y_ptr + offs, mask=p_ok[:, None], other=0.0).to(tl.float32)
        y = tl.where(p_ok[:, None], y - shift[None, :], 0.0)
        tile_count = tl.minimum(P - tile * BLOCK_P, BLOCK_P).to(tl.float32)
        count, mean, m2 = _merge_tile(y, p_ok, tile_count, count, mean, m2)
    row = tl.program_id(0) * C
    tl.store(mean_ptr + row + c, mean + shift, mask=c_ok)
    tl.store(m2_ptr + row + c, m2, mask=c_ok)
    tl.store(count_ptr + tl.program_id(0), count)


_stats_nchw, _stats_nhwc = _per_layout(_stats_kernel)


@shape_generic_jit
def _backward_reduce_kernel(g_ptr, y_ptr, scale_ptr, shift_ptr, mean_ptr, partial_ptr, C, HW, P, groups,
                            syn, syc, syp, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per group: partial sums of dz and dz * (y - mean), rows [sum_dz | sum_dz_ymu] of 2C.
    grad_out has y's strides."""
    start, end = group_tile_range(P, groups, BLOCK_P)
    c, c_ok, c_in = _tile_channels(C, BLOCK_C)
    scale, shift = _load_channel(scale_ptr, c_in), _load_channel(shift_ptr, c_in)
    mean = _load_channel(mean_ptr, c_in)
    sum_dz = tl.zeros((BLOCK_C,), tl.float32)
    sum_dz_ymu = tl.zeros((BLOCK_C,), tl.float32)
    for tile in range(start, end):
        offs, p_ok = _tile_offsets(tile, c_in, P, HW, syn, syc, syp, BLOCK_P)
        y = tl.load(y_ptr + offs, mask=p_ok[:, None], other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=p_ok[:, None], other=0.0).to(tl.float32)
        z = y * scale + shift
        s = tl.sigmoid(z)
        dz = g * s * (1.0 + z * (1.0 - s))  # 0 where p_ok is False (g is 0)
        sum_dz += tl.sum(dz, 0)
        sum_dz_ymu += tl.sum(dz * (y - mean), 0)
    row = partial_ptr + tl.program_id(0) * 2 * C
    tl.store(row + c, sum_dz, mask=c_ok)
    tl.store(row + C + c, sum_dz_ymu, mask=c_ok)


_backward_reduce_nchw, _backward_reduce_nhwc = _per_layout(_backward_reduce_kernel)


# ----------------------------------------------------------------------------- elementwise

@triton.jit
def _flat_block(numel, C, HW, CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
    """Elements of this program in storage order, which exist, and their channels."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if CHANNELS_LAST:
        c = i % C
    else:
        c = (i // HW) % C
    return i, i < numel, c


@autotuned(_FLAT_CONFIGS, _FLAT_INTERP, _FLAT_KEY)
@shape_generic_jit
def _forward_kernel(y_ptr, scale_ptr, shift_ptr, out_ptr, numel, C, HW, CHANNELS_LAST: tl.constexpr,
                    BLOCK: tl.constexpr):
    i, ok, c = _flat_block(numel, C, HW, CHANNELS_LAST, BLOCK)
    y = tl.load(y_ptr + i, mask=ok, other=0.0).to(tl.float32)
    z = y * tl.load(scale_ptr + c, mask=ok, other=0.0) + tl.load(shift_ptr + c, mask=ok, other=0.0)
    tl.store(out_ptr + i, (z * tl.sigmoid(z)).to(out_ptr.dtype.element_ty), mask=ok)


@autotuned(_FLAT_CONFIGS, _FLAT_INTERP, _FLAT_KEY)
@shape_generic_jit
def _backward_kernel(g_ptr, y_ptr, scale_ptr, shift_ptr, a_ptr, b_ptr, cc_ptr, out_ptr, numel, C, HW,
                     CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
    """grad_y = a * dz + b * y + c with dz = grad * silu'(y * scale + shift)."""
    i, ok, c = _flat_block(numel, C, HW, CHANNELS_LAST, BLOCK)
    y = tl.load(y_ptr + i, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + i, mask=ok, other=0.0).to(tl.float32)
    z = y * tl.load(scale_ptr + c, mask=ok, other=0.0) + tl.load(shift_ptr + c, mask=ok, other=0.0)
    s = tl.sigmoid(z)
    dz = g * s * (1.0 + z * (1.0 - s))
    coef_a = tl.load(a_ptr + c, mask=ok, other=0.0)
    coef_b = tl.load(b_ptr + c, mask=ok, other=0.0)
    coef_c = tl.load(cc_ptr + c, mask=ok, other=0.0)
    tl.store(out_ptr + i, (coef_a * dz + coef_b * y + coef_c).to(out_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------- launchers

def _vec(v):
    return v.to(torch.float32).contiguous()


def _layout_args(y):
    """y in a supported layout, and its (n, channel, pixel) strides."""
    y = as_supported_layout(y)
    check_supported(y)
    n, c, h, w = y.shape
    return y, (y.stride(0), y.stride(1), y.stride(3)), n, c, h * w


def _reduce_grid(c, groups):
    return lambda meta: (groups, triton.cdiv(c, meta["BLOCK_C"]))


def _flat_grid(numel):
    return lambda meta: (triton.cdiv(numel, meta["BLOCK"]),)


def _like_y(t, y):
    return t.contiguous(memory_format=memory_format_of(y))


def bn_silu_stats(y):
    y, strides, n, c, hw = _layout_args(y)
    pixels, groups = n * hw, num_groups(n * hw)
    f32 = dict(dtype=torch.float32, device=y.device)
    counts = torch.empty(groups, **f32)
    means, m2s = torch.empty(groups, c, **f32), torch.empty(groups, c, **f32)
    kernel = _stats_nhwc if is_channels_last(y) else _stats_nchw
    kernel[_reduce_grid(c, groups)](y, counts, means, m2s, c, hw, pixels, groups, *strides)
    mean, var = torch.empty(c, **f32), torch.empty(c, **f32)
    block_c = 64
    _merge_stats_kernel[(triton.cdiv(c, block_c),)](counts, means, m2s, mean, var, c, groups,
                                                     BLOCK_G=2 if INTERPRET else 16, BLOCK_C=block_c,
                                                     num_warps=4)
    return mean, var


def bn_silu_forward(y, scale, shift):
    y, _, n, c, hw = _layout_args(y)
    out = empty_like_layout(y, y.shape, y.dtype)
    _forward_kernel[_flat_grid(y.numel())](y, _vec(scale), _vec(shift), out, y.numel(), c, hw,
                                           CHANNELS_LAST=is_channels_last(y))
    return out


def bn_silu_backward_reduce(grad_out, y, scale, shift, mean):
    y, strides, n, c, hw = _layout_args(y)
    grad_out = _like_y(grad_out, y)
    check_supported(grad_out)
    pixels, groups = n * hw, num_groups(n * hw)
    partials = torch.empty(groups, 2 * c, dtype=torch.float32, device=y.device)
    kernel = _backward_reduce_nhwc if is_channels_last(y) else _backward_reduce_nchw
    kernel[_reduce_grid(c, groups)](grad_out, y, _vec(scale), _vec(shift), _vec(mean), partials, c, hw, pixels,
                                    groups, *strides)
    return sum_rows(partials, split=c)


def bn_silu_backward(grad_out, y, scale, shift, coef_a, coef_b, coef_c):
    y, _, n, c, hw = _layout_args(y)
    grad_out = _like_y(grad_out, y)
    check_supported(grad_out)
    grad_y = empty_like_layout(y, y.shape, y.dtype)
    _backward_kernel[_flat_grid(y.numel())](grad_out, y, _vec(scale), _vec(shift), _vec(coef_a), _vec(coef_b),
                                            _vec(coef_c), grad_y, y.numel(), c, hw,
                                            CHANNELS_LAST=is_channels_last(y))
    return grad_y
