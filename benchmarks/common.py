"""Shared pieces of the op benchmarks: B0's layer shapes, timing, copy bandwidth."""
import argparse
import sys

import torch

from effnet_fast.benchmark import best_seconds

BATCH = 16
# The distinct depthwise layers of EfficientNet-B0 at 224x224:
# (channels, input size, kernel, stride).
B0_DWCONV_LAYERS = [
    (32, 112, 3, 1), (96, 112, 3, 2), (144, 56, 3, 1), (144, 56, 5, 2), (240, 28, 5, 1), (240, 28, 3, 2),
    (480, 14, 3, 1), (480, 14, 5, 1), (672, 14, 5, 1), (672, 14, 5, 2), (1152, 7, 5, 1), (1152, 7, 3, 1),
]
# The BatchNorm + SiLU after B0's stem, expand and head convs: (channels, size).
B0_BN_SILU_LAYERS = [(32, 112), (96, 112), (144, 56), (240, 28), (480, 14), (672, 14), (1152, 7), (1280, 7)]

# The distinct squeeze-excitation shapes of B0: (channels, reduced channels, size).
B0_SE_LAYERS = [
    (32, 8, 112), (96, 4, 56), (144, 6, 56), (144, 6, 28), (240, 10, 28), (240, 10, 14), (480, 20, 14),
    (672, 28, 14), (672, 28, 7), (1152, 48, 7),
]


def layer_id(shape):
    return "x".join(str(v) for v in shape)


def copy_bandwidth(nbytes=512 << 20, repeats=5):
    """Bytes per second of a large tensor copy (read + write counted)."""
    src = torch.randn(nbytes // 4)
    dst = torch.empty_like(src)
    seconds = best_seconds(lambda: dst.copy_(src), repeats, warmup=2)
    return 2 * nbytes / seconds


def read_bandwidth(nbytes=512 << 20, repeats=5):
    """Bytes per second of a sum over a large tensor (one read)."""
    src = torch.randn(nbytes // 4)
    seconds = best_seconds(lambda: src.sum(), repeats, warmup=2)
    return nbytes / seconds


def input_tensor(n, c, h, w, channels_last, seed=0):
    x = torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed))
    return x.to(memory_format=torch.channels_last) if channels_last else x


def layouts():
    return [("NCHW", False), ("NHWC", True)]


def parse_bench_args(argv, doc, repeats, extra=None):
    """The op benchmarks' shared command line; `extra(parser)` adds a script's own options.
    Sets the thread count and exits with a message when the CPU kernels are not built."""
    from effnet_fast.ops import build_info
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--repeats", type=int, default=repeats)
    p.add_argument("--compile", action="store_true", help="add torch.compile of the eager layers (slow to compile)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    if extra:
        extra(p)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not build_info()["cpu"]:
        sys.exit("the CPU kernels are not built: pip install -e .")
    return args
