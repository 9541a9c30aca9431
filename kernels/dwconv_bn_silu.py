"""Depthwise conv + BatchNorm + SiLU in Triton: statistics, forward, and the two backward passes.

Every kernel works on tiles of BLOCK_P output pixels (flattened over N, H, W) by BLOCK_C
channels and reads tensors through their strides, so NCHW and channels_last share one
code path; the configs differ per layout (NCHW: one channel per tile, pixels along the
threads; channels_last: channels along the threads). The conv output y is recomputed
from x in every pass and never stored. The conv pads PAD_H zeros above and PAD_W left
of x (k // 2 by default; TF 'same' padding pads one less for stride 2 and even sizes);
the bottom and right padding only shows in OH and OW, as reads past H and W are masked.

Reductions over N*H*W (statistics, backward sums, grad_weight) run in two levels: a
program reduces the tiles of one pixel group into float32 partials, then a small kernel
merges the groups in a fixed order, so results are deterministic.
"""
import torch
import triton
import triton.language as tl

from ._common import (INTERPRET, autotuned, check_supported, empty_like_layout, group_tile_range, num_groups,
                      shape_generic_jit, sum_rows)
from .layout import conv_out_hw, is_channels_last

_KEY = ["C", "OH", "OW", "K", "STRIDE"]
# At most 4 elements per thread: the k*k tap loads are all in flight at once, and more
# spills registers at k = 5 (checked with ptxas for sm_90).
_NCHW_CONFIGS = [triton.Config({"BLOCK_P": 512, "BLOCK_C": 1}, num_warps=4),
                 triton.Config({"BLOCK_P": 512, "BLOCK_C": 1}, num_warps=8),
                 triton.Config({"BLOCK_P": 1024, "BLOCK_C": 1}, num_warps=8)]
_NHWC_CONFIGS = [triton.Config({"BLOCK_P": 16, "BLOCK_C": 32}, num_warps=4),
                 triton.Config({"BLOCK_P": 32, "BLOCK_C": 32}, num_warps=8),
                 triton.Config({"BLOCK_P": 16, "BLOCK_C": 64}, num_warps=8)]
# The backward dy kernel also holds the k*k grad_weight sums of its tile: at most 2
# elements per thread in channels_last, or it reaches 255 registers and spills at k = 5
# on sm_80 and sm_90 (168-172 registers here; benchmarks/triton_aot.py).
_NHWC_LEAN_CONFIGS = [triton.Config({"BLOCK_P": 8, "BLOCK_C": 32}, num_warps=4),
                      triton.Config({"BLOCK_P": 16, "BLOCK_C": 32}, num_warps=8),
                      triton.Config({"BLOCK_P": 8, "BLOCK_C": 64}, num_warps=8)]
# Under the interpreter, where each tile costs milliseconds: tiles about as large as the
# small test planes. Several channel blocks, partial tiles, empty groups, and several
# tiles and groups per channel (test_kernel_ops_many_blocks) still occur in the tests.
_NCHW_INTERP = _NHWC_INTERP = triton.Config({"BLOCK_P": 256, "BLOCK_C": 8})


def _per_layout(kernel, zeroed=None, nhwc_configs=_NHWC_CONFIGS):
    """(NCHW-tuned, channels_last-tuned) variants of one kernel. `zeroed` names an
    accumulator argument cleared before every run, autotuning runs included."""
    def configs(cfgs):
        if zeroed is None:
            return cfgs
        return [triton.Config(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages,
                              pre_hook=lambda nargs: nargs[zeroed].zero_()) for c in cfgs]
    return (autotuned(configs(_NCHW_CONFIGS), configs([_NCHW_INTERP])[0], _KEY)(kernel),
            autotuned(configs(nhwc_configs), configs([_NHWC_INTERP])[0], _KEY)(kernel))


# ----------------------------------------------------------------------------- tile helpers

@triton.jit
def _tile_pixels(tile, P, OH, OW, BLOCK_P: tl.constexpr):
    """(n, oh, ow) of the pixels of one tile, and which of them exist."""
    p = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    ow = p % OW
    t = p // OW
    return t // OH, t % OH, ow, p < P


@triton.jit
def _merge_tile(y, p_ok, tile_count, count, mean, m2):
    """Chan's merge of one tile's per-channel (count, mean, M2) into the running ones
    (y is zero where p_ok is False); returns the new (count, mean, m2)."""
    tile_mean = tl.sum(y, 0) / tile_count
    dev = tl.where(p_ok[:, None], y - tile_mean[None, :], 0.0)
    total = count + tile_count
    delta = tile_mean - mean
    mean += delta * (tile_count / total)
    m2 += tl.sum(dev * dev, 0) + delta * delta * (count * tile_count / total)
    return total, mean, m2


@triton.jit
def _tile_channels(C, BLOCK_C: tl.constexpr):
    """Channels of this program, which exist, and an in-range channel to read for each:
    reads need no channel mask, results of missing channels are masked on store."""
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    return c, c < C, tl.minimum(c, C - 1)


@triton.jit
def _conv_tile(x_ptr, w_ptr, n, oh, ow, c, p_ok, H, W, sxn, sxc, sxh, sxw,
               K: tl.constexpr, STRIDE, PAD_H, PAD_W, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """y = dwconv(x, w) on a tile, float32; exactly 0 where p_ok is False."""
    ih0, iw0 = oh * STRIDE - PAD_H, ow * STRIDE - PAD_W
    corner = x_ptr + (n * sxn + ih0 * sxh + iw0 * sxw)[:, None] + (c * sxc)[None, :]
    w_row = w_ptr + c * (K * K)
    y = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
    for kh in tl.static_range(K):
        ih = ih0 + kh
        row_ok = p_ok & (ih >= 0) & (ih < H)
        row = corner + kh * sxh
        for kw in tl.static_range(K):
            iw = iw0 + kw
            ok = row_ok & (iw >= 0) & (iw < W)
            xv = tl.load(row + kw * sxw, mask=ok[:, None], other=0.0)
            wv = tl.load(w_row + (kh * K + kw))
            y += xv.to(tl.float32) * wv.to(tl.float32)[None, :]
    return y


@triton.jit
def _load_channel(ptr, c):
    return tl.load(ptr + c).to(tl.float32)[None, :]


@triton.jit
def _silu_grad_dz(g_ptr, n, oh, ow, c, p_ok, sgn, sgc, sgh, sgw, y, scale, shift):
    """dz = grad_out * silu'(y * scale + shift) on a tile (0 where p_ok is False)."""
    g = tl.load(g_ptr + (n * sgn + oh * sgh + ow * sgw)[:, None] + (c * sgc)[None, :], mask=p_ok[:, None],
                other=0.0)
    z = y * scale + shift
    s = tl.sigmoid(z)
    return g.to(tl.float32) * s * (1.0 + z * (1.0 - s))


# ----------------------------------------------------------------------------- statistics

@shape_generic_jit
def _stats_kernel(x_ptr, w_ptr, count_ptr, mean_ptr, m2_ptr, C, H, W, OH, OW, P, groups,
                  sxn, sxc, sxh, sxw, K: tl.constexpr, STRIDE, PAD_H, PAD_W,
                  BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per group and channel: pixel count, mean and M2 (sum of squared deviations) of y.
    Each tile is reduced exactly (two passes in registers), tiles merge by Chan's formula."""
    start, end = group_tile_range(P, groups, BLOCK_P)
    c, c_ok, c_in = _tile_channels(C, BLOCK_C)
    count = 0.0
    mean = tl.zeros((BLOCK_C,), tl.float32)
    m2 = tl.zeros((BLOCK_C,), tl.float32)
    for tile in range(start, end):
        n, oh, ow, p_ok = _tile_pixels(tile, P, OH, OW, BLOCK_P)
        y = _conv_tile(x_ptr, w_ptr, n, oh, ow, c_in, p_ok, H, W, sxn, sxc, sxh, sxw, K, STRIDE, PAD_H, PAD_W, BLOCK_P, BLOCK_C)
        tile_count = tl.minimum(P - tile * BLOCK_P, BLOCK_P).to(tl.float32)
        count, mean, m2 = _merge_tile(y, p_ok, tile_count, count, mean, m2)
    row = tl.program_id(0) * C
    tl.store(mean_ptr + row + c, mean, mask=c_ok)
    tl.store(m2_ptr + row + c, m2, mask=c_ok)
    tl.store(count_ptr + tl.program_id(0), count)


@shape_generic_jit
def _merge_stats_kernel(count_ptr, mean_ptr, m2_ptr, out_mean_ptr, out_var_ptr, C, groups,
                        BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr):
    """Merge the per-group (count, mean, M2) of each channel: chunks of groups combine
    exactly around their weighted mean, chunks merge by Chan's formula."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    count = 0.0
    mean = tl.zeros((BLOCK_C,), tl.float32)
    m2 = tl.zeros((BLOCK_C,), tl.float32)
    for g0 in range(0, groups, BLOCK_G):
        g = g0 + tl.arange(0, BLOCK_G)
        g_ok = g < groups
        ok = g_ok[:, None] & c_ok[None, :]
        counts = tl.load(count_ptr + g, mask=g_ok, other=0.0)
        means = tl.load(mean_ptr + g[:, None] * C + c[None, :], mask=ok, other=0.0)
        m2s = tl.load(m2_ptr + g[:, None] * C + c[None, :], mask=ok, other=0.0)
        chunk_count = tl.sum(counts, 0)
        chunk_mean = tl.sum(counts[:, None] * means, 0) / tl.maximum(chunk_count, 1.0)
        dev = means - chunk_mean[None, :]
        chunk_m2 = tl.sum(m2s, 0) + tl.sum(counts[:, None] * dev * dev, 0)
        total = count + chunk_count
        delta = chunk_mean - mean
        mean += delta * (chunk_count / tl.maximum(total, 1.0))
        m2 += chunk_m2 + delta * delta * (count * chunk_count / tl.maximum(total, 1.0))
        count = total
    tl.store(out_mean_ptr + c, mean, mask=c_ok)
    tl.store(out_var_ptr + c, m2 / count, mask=c_ok)


_stats_nchw, _stats_nhwc = _per_layout(_stats_kernel)


# ----------------------------------------------------------------------------- forward

@shape_generic_jit
def _forward_kernel(x_ptr, w_ptr, scale_ptr, shift_ptr, out_ptr, C, H, W, OH, OW, P,
                    sxn, sxc, sxh, sxw, son, soc, soh, sow, K: tl.constexpr, STRIDE, PAD_H, PAD_W,
                    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    n, oh, ow, p_ok = _tile_pixels(tl.program_id(0), P, OH, OW, BLOCK_P)
    c, c_ok, c_in = _tile_channels(C, BLOCK_C)
    y = _conv_tile(x_ptr, w_ptr, n, oh, ow, c_in, p_ok, H, W, sxn, sxc, sxh, sxw, K, STRIDE, PAD_H, PAD_W, BLOCK_P, BLOCK_C)
    z = y * _load_channel(scale_ptr, c_in) + _load_channel(shift_ptr, c_in)
    out = z * tl.sigmoid(z)
    offs = (n * son + oh * soh + ow * sow)[:, None] + (c * soc)[None, :]
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=p_ok[:, None] & c_ok[None, :])


_forward_nchw, _forward_nhwc = _per_layout(_forward_kernel)


# ----------------------------------------------------------------------------- backward

@shape_generic_jit
def _backward_reduce_kernel(g_ptr, x_ptr, w_ptr, scale_ptr, shift_ptr, mean_ptr, partial_ptr,
                            C, H, W, OH, OW, P, groups, sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw,
                            K: tl.constexpr, STRIDE, PAD_H, PAD_W,
                            BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per group: partial sums of dz and dz * (y - mean), rows [sum_dz | sum_dz_xmu] of 2C."""
    start, end = group_tile_range(P, groups, BLOCK_P)
    c, c_ok, c_in = _tile_channels(C, BLOCK_C)
    scale, shift = _load_channel(scale_ptr, c_in), _load_channel(shift_ptr, c_in)
    mean = _load_channel(mean_ptr, c_in)
    sum_dz = tl.zeros((BLOCK_C,), tl.float32)
    sum_dz_xmu = tl.zeros((BLOCK_C,), tl.float32)
    for tile in range(start, end):
        n, oh, ow, p_ok = _tile_pixels(tile, P, OH, OW, BLOCK_P)
        y = _conv_tile(x_ptr, w_ptr, n, oh, ow, c_in, p_ok, H, W, sxn, sxc, sxh, sxw, K, STRIDE, PAD_H, PAD_W, BLOCK_P, BLOCK_C)
        dz = _silu_grad_dz(g_ptr, n, oh, ow, c_in, p_ok, sgn, sgc, sgh, sgw, y, scale, shift)
        sum_dz += tl.sum(dz, 0)
        sum_dz_xmu += tl.sum(dz * (y - mean), 0)
    row = partial_ptr + tl.program_id(0) * 2 * C
    tl.store(row + c, sum_dz, mask=c_ok)
    tl.store(row + C + c, sum_dz_xmu, mask=c_ok)


_backward_reduce_nchw, _backward_reduce_nhwc = _per_layout(_backward_reduce_kernel)


@shape_generic_jit
def _backward_dy_kernel(g_ptr, x_ptr, w_ptr, scale_ptr, shift_ptr, a_ptr, b_ptr, cc_ptr, dy_ptr, gw_ptr,
                        C, H, W, OH, OW, P, groups, sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw,
                        sdn, sdc, sdh, sdw, K: tl.constexpr, STRIDE, PAD_H, PAD_W,
                        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """dy = a * dz + b * y + c (stored in x's dtype for the grad_x pass) and, per group,
    grad_weight partials sum(dy * x_tap) added to the group's own row of gw_ptr
    ((groups, C, K*K), zeroed by the config's pre_hook); only this program touches that
    row, always in the same order, so the sums are deterministic."""
    start, end = group_tile_range(P, groups, BLOCK_P)
    c, c_ok, c_in = _tile_channels(C, BLOCK_C)
    scale, shift = _load_channel(scale_ptr, c_in), _load_channel(shift_ptr, c_in)
    coef_a, coef_b, coef_c = _load_channel(a_ptr, c_in), _load_channel(b_ptr, c_in), _load_channel(cc_ptr, c_in)
    gw_row = gw_ptr + tl.program_id(0) * C * (K * K) + c * (K * K)
    for tile in range(start, end):
        n, oh, ow, p_ok = _tile_pixels(tile, P, OH, OW, BLOCK_P)
        y = _conv_tile(x_ptr, w_ptr, n, oh, ow, c_in, p_ok, H, W, sxn, sxc, sxh, sxw, K, STRIDE, PAD_H, PAD_W, BLOCK_P, BLOCK_C)
        dz = _silu_grad_dz(g_ptr, n, oh, ow, c_in, p_ok, sgn, sgc, sgh, sgw, y, scale, shift)
        dy = tl.where(p_ok[:, None], coef_a * dz + coef_b * y + coef_c, 0.0)
        tl.store(dy_ptr + (n * sdn + oh * sdh + ow * sdw)[:, None] + (c * sdc)[None, :], dy.to(dy_ptr.dtype.element_ty),
                 mask=p_ok[:, None] & c_ok[None, :])
        ih0, iw0 = oh * STRIDE - PAD_H, ow * STRIDE - PAD_W
        corner = x_ptr + (n * sxn + ih0 * sxh + iw0 * sxw)[:, None] + (c_in * sxc)[None, :]
        for kh in tl.static_range(K):
            ih = ih0 + kh
            row_ok = p_ok & (ih >= 0) & (ih < H)
            row = corner + kh * sxh
            for kw in tl.static_range(K):
                iw = iw0 + kw
                ok = row_ok & (iw >= 0) & (iw < W)
                xv = tl.load(row + kw * sxw, mask=ok[:, None], other=0.0)
                tl.atomic_add(gw_row + (kh * K + kw), tl.sum(dy * xv.to(tl.float32), 0), mask=c_ok,
                              sem="relaxed")


_backward_dy_nchw, _backward_dy_nhwc = _per_layout(_backward_dy_kernel, zeroed="gw_ptr",
                                                   nhwc_configs=_NHWC_LEAN_CONFIGS)


@shape_generic_jit
def _grad_input_kernel(dy_ptr, w_ptr, gx_ptr, C, H, W, OH, OW, Q, sdn, sdc, sdh, sdw, sgn, sgc, sgh, sgw,
                       K: tl.constexpr, STRIDE, PAD_H, PAD_W, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """grad_x = transposed depthwise conv of dy, on tiles of input pixels (Q = N*H*W).
    Input row ih gets tap kh from output row (ih + PAD_H - kh) / STRIDE when that divides
    exactly; STRIDE is 1 or 2, so the division is a shift."""
    shift = STRIDE - 1
    n, ih, iw, q_ok = _tile_pixels(tl.program_id(0), Q, H, W, BLOCK_P)
    c, c_ok, c_in = _tile_channels(C, BLOCK_C)
    base = dy_ptr + (n * sdn)[:, None] + (c_in * sdc)[None, :]
    w_row = w_ptr + c_in * (K * K)
    acc = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
    for kh in tl.static_range(K):
        th = ih + (PAD_H - kh)
        oh = th >> shift
        row_ok = q_ok & (th >= 0) & (oh < OH) & ((th & shift) == 0)
        row = base + (oh * sdh)[:, None]
        for kw in tl.static_range(K):
            tw = iw + (PAD_W - kw)
            ow = tw >> shift
            ok = row_ok & (tw >= 0) & (ow < OW) & ((tw & shift) == 0)
            dy = tl.load(row + (ow * sdw)[:, None], mask=ok[:, None], other=0.0)
            wv = tl.load(w_row + (kh * K + kw))
            acc += dy.to(tl.float32) * wv.to(tl.float32)[None, :]
    offs = (n * sgn + ih * sgh + iw * sgw)[:, None] + (c * sgc)[None, :]
    tl.store(gx_ptr + offs, acc.to(gx_ptr.dtype.element_ty), mask=q_ok[:, None] & c_ok[None, :])


_grad_input_nchw, _grad_input_nhwc = _per_layout(_grad_input_kernel)


# ----------------------------------------------------------------------------- launchers

def _geometry(x, weight, stride, padding):
    """(n, c, h, w, k, oh, ow, launch arguments of the conv: K, STRIDE, PAD_H, PAD_W)."""
    if stride not in (1, 2) or weight.shape[-1] not in (3, 5):
        raise ValueError(f"effnet_fast triton kernels: stride must be 1 or 2 and the kernel 3x3 or 5x5, "
                         f"got stride {stride} and weight {tuple(weight.shape)}")
    n, c, h, w = x.shape
    k = weight.shape[-1]
    if padding is None:
        padding = (k // 2,) * 4
    if len(padding) != 4 or not all(0 <= p <= k // 2 for p in padding):
        raise ValueError(f"effnet_fast triton kernels: padding must be (top, bottom, left, right), each in "
                         f"[0, k // 2 = {k // 2}], got {tuple(padding)}")
    oh, ow = conv_out_hw(h, w, k, stride, padding)
    if oh < 1 or ow < 1:
        raise ValueError(f"effnet_fast triton kernels: a {h}x{w} input padded by {tuple(padding)} is smaller "
                         f"than the {k}x{k} kernel")
    return n, c, h, w, k, oh, ow, dict(K=k, STRIDE=stride, PAD_H=padding[0], PAD_W=padding[2])


def _vec(v):
    return v.to(torch.float32).contiguous()


def _pick(pair, x):
    return pair[1] if is_channels_last(x) else pair[0]


def _grid(pixels, c, groups=None):
    if groups is not None:
        return lambda meta: (groups, triton.cdiv(c, meta["BLOCK_C"]))
    return lambda meta: (triton.cdiv(pixels, meta["BLOCK_P"]), triton.cdiv(c, meta["BLOCK_C"]))


def dwconv_bn_silu_stats(x, weight, stride, padding=None):
    check_supported(x)
    n, c, h, w, k, oh, ow, conv = _geometry(x, weight, stride, padding)
    pixels, groups = n * oh * ow, num_groups(n * oh * ow)
    f32 = dict(dtype=torch.float32, device=x.device)
    counts = torch.empty(groups, **f32)
    means, m2s = torch.empty(groups, c, **f32), torch.empty(groups, c, **f32)
    _pick((_stats_nchw, _stats_nhwc), x)[_grid(pixels, c, groups)](
        x, weight.contiguous(), counts, means, m2s, c, h, w, oh, ow, pixels, groups, *x.stride(), **conv)
    mean, var = torch.empty(c, **f32), torch.empty(c, **f32)
    block_c = 64
    _merge_stats_kernel[(triton.cdiv(c, block_c),)](counts, means, m2s, mean, var, c, groups,
                                                     BLOCK_G=2 if INTERPRET else 16, BLOCK_C=block_c,
                                                     num_warps=4)
    return mean, var


def dwconv_bn_silu_forward(x, weight, scale, shift, stride, padding=None):
    check_supported(x)
    n, c, h, w, k, oh, ow, conv = _geometry(x, weight, stride, padding)
    out = empty_like_layout(x, (n, c, oh, ow), x.dtype)
    check_supported(out)
    _pick((_forward_nchw, _forward_nhwc), x)[_grid(n * oh * ow, c)](
        x, weight.contiguous(), _vec(scale), _vec(shift), out, c, h, w, oh, ow, n * oh * ow,
        *x.stride(), *out.stride(), **conv)
    return out


def dwconv_bn_silu_backward_reduce(grad_out, x, weight, scale, shift, mean, stride, padding=None):
    check_supported(x, grad_out)
    n, c, h, w, k, oh, ow, conv = _geometry(x, weight, stride, padding)
    pixels, groups = n * oh * ow, num_groups(n * oh * ow)
    partials = torch.empty(groups, 2 * c, dtype=torch.float32, device=x.device)
    _pick((_backward_reduce_nchw, _backward_reduce_nhwc), x)[_grid(pixels, c, groups)](
        grad_out, x, weight.contiguous(), _vec(scale), _vec(shift), _vec(mean), partials,
        c, h, w, oh, ow, pixels, groups, *x.stride(), *grad_out.stride(), **conv)
    return sum_rows(partials, split=c)


def dwconv_bn_silu_backward(grad_out, x, weight, scale, shift, coef_a, coef_b, coef_c, stride, padding=None):
    check_supported(x, grad_out)
    n, c, h, w, k, oh, ow, conv = _geometry(x, weight, stride, padding)
    pixels, groups = n * oh * ow, num_groups(n * oh * ow)
    weight = weight.contiguous()
    # dy in x's dtype: grad_x is rounded to it anyway, and half inputs move half the bytes.
    dy = empty_like_layout(x, (n, c, oh, ow), x.dtype)
    gw_partials = torch.empty(groups, c * k * k, dtype=torch.float32, device=x.device)  # zeroed by the launch
    _pick((_backward_dy_nchw, _backward_dy_nhwc), x)[_grid(pixels, c, groups)](
        grad_out, x, weight, _vec(scale), _vec(shift), _vec(coef_a), _vec(coef_b), _vec(coef_c), dy,
        gw_partials, c, h, w, oh, ow, pixels, groups, *x.stride(), *grad_out.stride(), *dy.stride(), **conv)
    grad_x = empty_like_layout(x, x.shape, x.dtype)
    _pick((_grad_input_nchw, _grad_input_nhwc), x)[_grid(n * h * w, c)](
        dy, weight, grad_x, c, h, w, oh, ow, n * h * w, *dy.stride(), *grad_x.stride(), **conv)
    grad_weight = sum_rows(gw_partials, weight.dtype).view(weight.shape)
    return grad_x, grad_weight
