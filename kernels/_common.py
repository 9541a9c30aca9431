"""Launch helpers shared by the Triton kernels: autotuning, work split, final reductions."""
import inspect
import os

import torch
import triton
import triton.language as tl

from .layout import memory_format_of

# Under the interpreter (CPU tensors) every program runs in Python: one small config,
# no autotuning. On a GPU a few configs are tried per shape.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# EFFNET_FAST_TRITON_AUTOTUNE=0 keeps only the first (heuristic) config of each list.
AUTOTUNE = os.environ.get("EFFNET_FAST_TRITON_AUTOTUNE", "1") != "0"

# Reductions over N*H*W are split into at most this many pixel groups; each program
# reduces one group of one channel block, and a second small kernel merges the groups.
MAX_GROUPS = 4 if INTERPRET else 1024
PIXELS_PER_GROUP = 64 if INTERPRET else 2048

_INT32_LIMIT = 2 ** 31


# Sizes and the stride stay runtime values (no specialisation on divisibility by 16 or on
# being 1): one compiled kernel serves every layer shape of a model. Tensor strides, and
# the row length L of the SE reductions, are still specialised: they tell Triton which
# dimension is contiguous and whether rows are aligned for vector loads.
_SHAPE_ARGS = ("C", "H", "W", "OH", "OW", "P", "Q", "N", "groups", "STRIDE", "R", "rows", "cols", "split",
               "rows_per_split", "numel", "HW")


def shape_generic_jit(fn):
    names = inspect.signature(fn).parameters
    return triton.jit(fn, do_not_specialize=[n for n in _SHAPE_ARGS if n in names])


def _quick_bench(fn, quantiles=None):
    return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


def autotuned(gpu_configs, interpreter_config, key, **kwargs):
    """triton.autotune over `gpu_configs` on a GPU, or over the single interpreter config."""
    if INTERPRET:
        configs = [interpreter_config]
    else:
        configs = gpu_configs if AUTOTUNE else gpu_configs[:1]
    try:
        return triton.autotune(configs=configs, key=key, do_bench=_quick_bench, **kwargs)
    except TypeError:  # older Triton without the do_bench argument
        return triton.autotune(configs=configs, key=key, **kwargs)


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_supported(*tensors):
    """Refuse, with a clear message, dtypes the kernels do not handle and tensors too
    large for their int32 indexing."""
    for t in tensors:
        if t.dtype not in _DTYPES:
            raise TypeError(f"effnet_fast triton kernels: unsupported dtype {t.dtype}; supported: {_DTYPES}")
        if t.numel() >= _INT32_LIMIT:
            raise ValueError(f"effnet_fast triton kernels: tensor of shape {tuple(t.shape)} has "
                             f"{t.numel()} elements, more than the 2**31 - 1 supported")


def empty_like_layout(x, shape, dtype):
    """An uninitialised tensor of `shape` in x's memory format."""
    return torch.empty(shape, dtype=dtype, device=x.device, memory_format=memory_format_of(x))


def num_groups(pixels):
    return max(1, min(MAX_GROUPS, triton.cdiv(pixels, PIXELS_PER_GROUP)))


@triton.jit
def group_tile_range(pixels, groups, BLOCK_P: tl.constexpr):
    """Tiles [start, end) of BLOCK_P pixels that program group tl.program_id(0) reduces."""
    tiles = tl.cdiv(pixels, BLOCK_P)
    per_group = tl.cdiv(tiles, groups)
    start = tl.program_id(0) * per_group
    return start, tl.minimum(start + per_group, tiles)


@shape_generic_jit
def _sum_rows_kernel(src_ptr, out_ptr, out2_ptr, rows, cols, split, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr):
    col = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col_ok = col < cols
    acc = tl.zeros((BLOCK_R, BLOCK_M), tl.float32)
    for r0 in range(0, rows, BLOCK_R):
        row = r0 + tl.arange(0, BLOCK_R)
        ok = (row < rows)[:, None] & col_ok[None, :]
        acc += tl.load(src_ptr + row[:, None] * cols + col[None, :], mask=ok, other=0.0)
    total = tl.sum(acc, 0).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + col, total, mask=col < split)
    tl.store(out2_ptr + (col - split), total, mask=(col >= split) & col_ok)


def sum_rows(partials, dtype=torch.float32, split=None):
    """Column sums of a contiguous float32 (rows, cols) tensor, in a fixed order; with
    `split`, two separate tensors: the sums of columns [0, split) and [split, cols)."""
    rows, cols = partials.shape
    split = cols if split is None else split
    out = torch.empty(split, dtype=dtype, device=partials.device)
    out2 = torch.empty(cols - split, dtype=dtype, device=partials.device) if split < cols else out
    block_m = 64 if INTERPRET else 128
    _sum_rows_kernel[(triton.cdiv(cols, block_m),)](partials, out, out2, rows, cols, split, BLOCK_R=8,
                                                     BLOCK_M=block_m, num_warps=4)
    return out if split == cols else (out, out2)
