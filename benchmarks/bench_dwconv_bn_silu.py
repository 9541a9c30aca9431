"""Depthwise conv + BN + SiLU at B0's depthwise shapes: eager nn layers vs the fused
CPU kernels, eval forward and training forward + backward, NCHW and channels_last.

  python benchmarks/bench_dwconv_bn_silu.py [--repeats 3] [--batch 16] [--compile]
  pytest benchmarks/bench_dwconv_bn_silu.py --benchmark-enable   (pytest-benchmark rows)

The summary compares eval time with the memory floor: (bytes of x + bytes of the
output) / the copy bandwidth measured in the same run.
"""
import sys

import pytest
import torch

from common import B0_DWCONV_LAYERS, BATCH, copy_bandwidth, input_tensor, layer_id, layouts, parse_bench_args
from effnet_fast.benchmark import best_seconds
from effnet_fast.layers import DWConvBNSiLU, FusedDWConvBNSiLU
from effnet_fast.ops import build_info
from effnet_fast.ops.common import conv_out_size

IMPLS = ("eager", "fused")


def make_layer(impl, c, k, s, channels_last, seed=0):
    torch.manual_seed(seed)
    layer = DWConvBNSiLU(c, k, s) if impl in ("eager", "compile") else FusedDWConvBNSiLU(c, k, s, backend="cpu")
    with torch.no_grad():
        layer.bn.weight.uniform_(0.5, 1.5)
        layer.bn.bias.uniform_(-0.5, 0.5)
        layer.bn.running_var.uniform_(0.5, 2.0)
    if channels_last:
        layer = layer.to(memory_format=torch.channels_last)
    return torch.compile(layer) if impl == "compile" else layer


def eval_fn(layer, x):
    layer.eval()

    def run():
        with torch.no_grad():
            return layer(x)
    return run


def train_fn(layer, x):
    layer.train()
    x = x.detach().requires_grad_()
    grad = torch.randn_like(layer(x))

    def run():
        x.grad = None
        layer(x).backward(grad)
    return run


def measure(shape, channels_last, impl, batch, repeats):
    c, h, k, s = shape
    x = input_tensor(batch, c, h, h, channels_last)
    layer = make_layer(impl, c, k, s, channels_last)
    return best_seconds(eval_fn(layer, x), repeats), best_seconds(train_fn(layer, x), repeats)


def floor_seconds(shape, batch, bandwidth):
    c, h, k, s = shape
    out = conv_out_size(h, k, s)
    return 4 * batch * c * (h * h + out * out) / bandwidth


def main(argv=None):
    args = parse_bench_args(argv, __doc__, repeats=3, extra=lambda p: p.add_argument(
        "--layout", choices=("NCHW", "NHWC", "both"), default="both"))
    impls = IMPLS + (("compile",) if args.compile else ())
    bandwidth = copy_bandwidth()
    print(f"depthwise conv+BN+SiLU, B0 shapes, batch {args.batch}, float32, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, copy bandwidth {bandwidth / 1e9:.1f} GB/s, best of {args.repeats}")
    for name, cl in layouts():
        if args.layout not in (name, "both"):
            continue
        totals = {impl: [0.0, 0.0] for impl in impls}
        total_floor = 0.0
        head = f"{'C,H,k,s':<16}" + "".join(f"{impl + ' eval':>13}" for impl in impls)
        head += f"{'x eager':>9}{'floor':>8}{'x floor':>9}" + "".join(f"{impl + ' train':>14}" for impl in impls)
        head += f"{'x eager':>9}"
        print(f"\n{name} (ms)\n{head}")
        for shape in B0_DWCONV_LAYERS:
            times = {impl: measure(shape, cl, impl, args.batch, args.repeats) for impl in impls}
            floor = floor_seconds(shape, args.batch, bandwidth)
            total_floor += floor
            for impl in impls:
                totals[impl][0] += times[impl][0]
                totals[impl][1] += times[impl][1]
            print(row(layer_id(shape), impls, times, floor))
        print(row("sum", impls, totals, total_floor))
    return 0


def row(label, impls, times, floor):
    ev = {i: times[i][0] for i in impls}
    tr = {i: times[i][1] for i in impls}
    line = f"{label:<16}" + "".join(f"{ev[i] * 1e3:>13.2f}" for i in impls)
    line += f"{ev['eager'] / ev['fused']:>9.2f}{floor * 1e3:>8.2f}{ev['fused'] / floor:>9.2f}"
    line += "".join(f"{tr[i] * 1e3:>14.2f}" for i in impls) + f"{tr['eager'] / tr['fused']:>9.2f}"
    return line


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", B0_DWCONV_LAYERS, ids=layer_id)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_dwconv_bn_silu(benchmark, mode, shape, impl, channels_last):
    if not build_info()["cpu"]:
        pytest.skip("the CPU kernels are not built")
    c, h, k, s = shape
    layer = make_layer(impl, c, k, s, channels_last)
    x = input_tensor(BATCH, c, h, h, channels_last)
    fn = eval_fn(layer, x) if mode == "eval" else train_fn(layer, x)
    benchmark.pedantic(fn, rounds=3, warmup_rounds=1)


if __name__ == "__main__":
    sys.exit(main())
