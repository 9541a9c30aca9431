"""BatchNorm + SiLU at B0's stem / expand / head shapes: eager F.silu(bn(y)) vs the fused
CPU kernels, NCHW and channels_last.

  python benchmarks/bench_bn_silu.py [--repeats 5] [--batch 16] [--layout NHWC]

Columns: eval apply (running statistics: one read of y, one write), the training
statistics alone (eager torch.var_mean vs the bn_silu_stats kernel: one read of y), and a
training forward + backward. "x floor" is the time over the memory floor: bytes in + out
over the copy bandwidth for apply, bytes of y over the read bandwidth (a sum over a large
tensor) for the statistics, both measured in the same run.
"""
import sys

import torch
import torch.nn.functional as F
from torch import nn

from common import B0_BN_SILU_LAYERS, copy_bandwidth, input_tensor, layer_id, layouts, parse_bench_args, read_bandwidth
from effnet_fast.benchmark import best_seconds
from effnet_fast.ops.bn_silu import bn_silu

IMPLS = ("eager", "fused")


def make_bn(c, seed=0):
    torch.manual_seed(seed)
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return bn


def forward(impl, bn, y):
    return F.silu(bn(y), inplace=True) if impl == "eager" else bn_silu(y, bn, "cpu")


def eval_fn(impl, bn, y):
    bn.eval()

    def run():
        with torch.no_grad():
            return forward(impl, bn, y)
    return run


def stats_fn(impl, y):
    if impl == "eager":
        return lambda: torch.var_mean(y, dim=(0, 2, 3), unbiased=False)
    return lambda: torch.ops.effnet_fast.bn_silu_stats(y)


def train_fn(impl, bn, y):
    bn.train()
    y = y.detach().requires_grad_()
    grad = torch.randn_like(y)

    def run():
        y.grad = None
        forward(impl, bn, y).backward(grad)
    return run


def measure(shape, channels_last, impl, batch, repeats):
    c, h = shape
    y = input_tensor(batch, c, h, h, channels_last)
    bn = make_bn(c)
    return {"eval": best_seconds(eval_fn(impl, bn, y), repeats), "stats": best_seconds(stats_fn(impl, y), repeats),
            "train": best_seconds(train_fn(impl, bn, y), repeats)}


def main(argv=None):
    args = parse_bench_args(argv, __doc__, repeats=5, extra=lambda p: p.add_argument(
        "--layout", choices=("NCHW", "NHWC", "both"), default="both"))
    copy_bw, read_bw = copy_bandwidth(), read_bandwidth()
    print(f"BatchNorm+SiLU, B0 stem/expand/head shapes, batch {args.batch}, float32, {torch.get_num_threads()} "
          f"threads, torch {torch.__version__}, copy bandwidth {copy_bw / 1e9:.1f} GB/s, read bandwidth "
          f"{read_bw / 1e9:.1f} GB/s, best of {args.repeats}")
    for name, cl in layouts():
        if args.layout not in (name, "both"):
            continue
        print(f"\n{name} (ms)")
        print(f"{'C,H':<10}{'eager eval':>11}{'fused eval':>11}{'x eager':>8}{'floor':>7}{'x floor':>8}"
              f"{'eager stats':>12}{'fused stats':>12}{'x eager':>8}{'floor':>7}{'x floor':>8}"
              f"{'eager train':>12}{'fused train':>12}{'x eager':>8}")
        totals = {impl: {"eval": 0.0, "stats": 0.0, "train": 0.0} for impl in IMPLS}
        floors = [0.0, 0.0]
        for shape in B0_BN_SILU_LAYERS:
            c, h = shape
            times = {impl: measure(shape, cl, impl, args.batch, args.repeats) for impl in IMPLS}
            nbytes = 4 * args.batch * c * h * h
            floor = (2 * nbytes / copy_bw, nbytes / read_bw)
            for impl in IMPLS:
                for mode in totals[impl]:
                    totals[impl][mode] += times[impl][mode]
            floors = [floors[0] + floor[0], floors[1] + floor[1]]
            print(row(layer_id(shape), times, floor))
        print(row("sum", totals, floors))
    return 0


def row(label, times, floor):
    e, f = times["eager"], times["fused"]
    line = f"{label:<10}{e['eval'] * 1e3:>11.2f}{f['eval'] * 1e3:>11.2f}{e['eval'] / f['eval']:>8.2f}"
    line += f"{floor[0] * 1e3:>7.2f}{f['eval'] / floor[0]:>8.2f}"
    line += f"{e['stats'] * 1e3:>12.2f}{f['stats'] * 1e3:>12.2f}{e['stats'] / f['stats']:>8.2f}"
    line += f"{floor[1] * 1e3:>7.2f}{f['stats'] / floor[1]:>8.2f}"
    line += f"{e['train'] * 1e3:>12.2f}{f['train'] * 1e3:>12.2f}{e['train'] / f['train']:>8.2f}"
    return line


if __name__ == "__main__":
    sys.exit(main())
