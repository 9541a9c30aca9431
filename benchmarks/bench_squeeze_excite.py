"""Squeeze-excitation at B0's SE shapes: eager nn layer vs the fused CPU kernels,
forward + backward (and eval forward), NCHW and channels_last.

  python benchmarks/bench_squeeze_excite.py [--repeats 5] [--batch 16] [--compile]
  pytest benchmarks/bench_squeeze_excite.py --benchmark-enable   (pytest-benchmark rows)
"""
import sys

import pytest
import torch

from common import B0_SE_LAYERS, BATCH, copy_bandwidth, input_tensor, layer_id, layouts, parse_bench_args
from effnet_fast.benchmark import best_seconds
from effnet_fast.layers import FusedSqueezeExcitation, SqueezeExcitation
from effnet_fast.ops import build_info

IMPLS = ("eager", "fused")


def make_layer(impl, c, cr, seed=0):
    torch.manual_seed(seed)
    layer = FusedSqueezeExcitation(c, cr, backend="cpu") if impl == "fused" else SqueezeExcitation(c, cr)
    return torch.compile(layer) if impl == "compile" else layer


def eval_fn(layer, x):
    def run():
        with torch.no_grad():
            return layer(x)
    return run


def train_fn(layer, x):
    x = x.detach().requires_grad_()
    grad = torch.randn_like(x)

    def run():
        x.grad = None
        layer(x).backward(grad)
    return run


def measure(shape, channels_last, impl, batch, repeats):
    c, cr, h = shape
    x = input_tensor(batch, c, h, h, channels_last)
    layer = make_layer(impl, c, cr)
    return best_seconds(eval_fn(layer, x), repeats), best_seconds(train_fn(layer, x), repeats)


def main(argv=None):
    args = parse_bench_args(argv, __doc__, repeats=5)
    impls = IMPLS + (("compile",) if args.compile else ())
    bandwidth = copy_bandwidth()
    print(f"squeeze-excitation, B0 shapes, batch {args.batch}, float32, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, copy bandwidth {bandwidth / 1e9:.1f} GB/s, best of {args.repeats}")
    for name, cl in layouts():
        totals = {impl: [0.0, 0.0] for impl in impls}
        head = f"{'C,Cr,H':<14}" + "".join(f"{i + ' fwd':>12}" for i in impls) + f"{'x eager':>9}"
        head += "".join(f"{i + ' fwd+bwd':>16}" for i in impls) + f"{'x eager':>9}"
        print(f"\n{name} (ms)\n{head}")
        for shape in B0_SE_LAYERS:
            times = {impl: measure(shape, cl, impl, args.batch, args.repeats) for impl in impls}
            for impl in impls:
                totals[impl][0] += times[impl][0]
                totals[impl][1] += times[impl][1]
            print(row(layer_id(shape), impls, times))
        print(row("sum", impls, totals))
    return 0


def row(label, impls, times):
    line = f"{label:<14}" + "".join(f"{times[i][0] * 1e3:>12.2f}" for i in impls)
    line += f"{times['eager'][0] / times['fused'][0]:>9.2f}"
    line += "".join(f"{times[i][1] * 1e3:>16.2f}" for i in impls)
    return line + f"{times['eager'][1] / times['fused'][1]:>9.2f}"


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", B0_SE_LAYERS, ids=layer_id)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_squeeze_excite(benchmark, mode, shape, impl, channels_last):
    if not build_info()["cpu"]:
        pytest.skip("the CPU kernels are not built")
    c, cr, h = shape
    layer = make_layer(impl, c, cr)
    x = input_tensor(BATCH, c, h, h, channels_last)
    fn = eval_fn(layer, x) if mode == "eval" else train_fn(layer, x)
    benchmark.pedantic(fn, rounds=3, warmup_rounds=1)


if __name__ == "__main__":
    sys.exit(main())
