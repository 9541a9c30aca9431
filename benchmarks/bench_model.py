"""Whole EfficientNet: eval forward, training step and saved-for-backward bytes,
reference (eager) vs fused vs torch.compile, measured in one run: the models take turns,
and each row is the median of its turns.

  python benchmarks/bench_model.py [--version b0] [--batch 16] [--compile] [--fused cpu]
  pytest benchmarks/bench_model.py --benchmark-enable      (pytest-benchmark rows)
"""
import argparse
import sys

import pytest
import torch

from effnet_fast import EfficientNet
from effnet_fast.benchmark import eval_forward, train_step, wall_times


def make(version, fused, channels_last, compile_mode=False, seed=0):
    torch.manual_seed(seed)
    model = EfficientNet(version, fused=fused)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    run = torch.compile(model) if compile_mode else model
    return model, run, opt


def inputs(batch, size, channels_last, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=g)
    y = torch.randint(0, 1000, (batch,), generator=g)
    return (x.to(memory_format=torch.channels_last) if channels_last else x), y


def saved_bytes(model, x):
    """Bytes kept for backward by one training forward, each storage counted once."""
    seen = {}

    def pack(t):
        if t.device.type != "meta" and t.untyped_storage().nbytes():
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    seen.pop(x.untyped_storage().data_ptr(), None)  # the input exists anyway
    del out
    return sum(seen.values())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", default="b0")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--fused", default="cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="add torch.compile rows (compiles for minutes on a CPU)")
    p.add_argument("--profile", action="store_true", help="only profile one eval forward of the fused model")
    args = p.parse_args(argv)
    if args.profile:
        return profile_eval(args)
    print(f"{args.version}, batch {args.batch}, {args.size}x{args.size}, float32, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    configs = [("eager", False, False, False), ("eager", False, True, False),
               (f"fused={args.fused}", args.fused, False, False), (f"fused={args.fused}", args.fused, True, False)]
    if args.compile:
        configs += [("torch.compile", False, True, True)]
    runs = []
    for label, fused, cl, comp in configs:
        model, run, opt = make(args.version, fused, cl, comp)
        x, y = inputs(args.batch, args.size, cl)
        fwd, step = (lambda: eval_forward(model, x, run)), (lambda: train_step(model, opt, x, y, run))
        fwd(), step()  # warm-up (and compilation)
        runs.append((label, "channels_last" if cl else "NCHW", fwd, step,
                     float("nan") if comp else saved_bytes(model, x)))
        print(f"  built {label} {'NHWC' if cl else 'NCHW'}", file=sys.stderr)
    # Round-robin over the models, so that the machine's drift spreads evenly over them.
    times = [([], []) for _ in runs]
    for _ in range(args.repeats):
        for (_, _, fwd, step, _), (fwd_times, step_times) in zip(runs, times):
            fwd_times.append(wall_times(fwd, 1, warmup=0)[0])
            step_times.append(wall_times(step, 1, warmup=0)[0])
    median = lambda ts: sorted(ts)[len(ts) // 2]  # noqa: E731
    rows = [(label, layout, median(f), median(s), nbytes)
            for (label, layout, _, _, nbytes), (f, s) in zip(runs, times)]
    base_fwd, base_step, base_bytes = rows[0][2], rows[0][3], rows[0][4]
    print(f"{'model':<18}{'layout':<15}{'eval fwd ms':>12}{'x eager':>9}{'train step ms':>15}{'x eager':>9}"
          f"{'saved MiB':>11}{'vs eager':>10}")
    for label, layout, fwd, step, nbytes in rows:
        print(f"{label:<18}{layout:<15}{fwd * 1e3:>12.1f}{base_fwd / fwd:>9.2f}{step * 1e3:>15.1f}"
              f"{base_step / step:>9.2f}{nbytes / 2**20:>11.1f}{(nbytes / base_bytes - 1) * 100:>9.1f}%")
    print("(x eager: speedup over eager NCHW; vs eager: saved-for-backward bytes relative to eager NCHW)")


def profile_eval(args):
    """Where the fused model's eval forward spends its time (channels_last), by op."""
    model, _, _ = make(args.version, args.fused, True)
    x, _ = inputs(args.batch, args.size, True)
    eval_forward(model, x)
    with torch.profiler.profile() as prof:
        eval_forward(model, x)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


LAYOUTS = [pytest.param(False, id="nchw"), pytest.param(True, id="channels_last")]
MODELS = [pytest.param(False, id="eager"), pytest.param("cpu", id="fused_cpu")]


@pytest.mark.parametrize("channels_last", LAYOUTS)
@pytest.mark.parametrize("fused", MODELS)
def test_b0_eval_forward(benchmark, fused, channels_last):
    model, run, _ = make("b0", fused, channels_last)
    x, _ = inputs(16, 224, channels_last)
    benchmark.pedantic(eval_forward, args=(model, x, run), rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("channels_last", LAYOUTS)
@pytest.mark.parametrize("fused", MODELS)
def test_b0_train_step(benchmark, fused, channels_last):
    model, run, opt = make("b0", fused, channels_last)
    x, y = inputs(16, 224, channels_last)
    benchmark.pedantic(train_step, args=(model, opt, x, y, run), rounds=3, warmup_rounds=1)


if __name__ == "__main__":
    main()
