"""`effnet-fast bench`: the eval forward and training step of the reference and fused
models, timed in turns (effnet_fast.app.benchmark.bench_models)."""
import functools
import math
import sys

import torch

from ..efficientnet import VARIANTS
from .args import FUSED_METAVAR, FUSED_NAMES, HelpFormatter, check_fused_on_device, default_device, device_arg
from .args import fused_arg, positive_int
from .benchmark import bench_models

BENCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Timing spread (slowest / fastest call - 1) above which a bench warns that the machine was busy.
BUSY_SPREAD = 0.25


def add_command(sub):
    """The `bench` subcommand of the command line."""
    p = sub.add_parser("bench", formatter_class=HelpFormatter,
                       help="time the reference and fused models (eval forward and training step)",
                       description="The reference and the fused model take turns; BN statistics are calibrated "
                                   "first and\nthe outputs compared before timing.")
    p.add_argument("--version", default="b0", choices=sorted(VARIANTS), help="variant")
    p.add_argument("--batch", type=positive_int, default=16, help="batch size")
    p.add_argument("--size", type=positive_int, help="input size (default: the variant's resolution)")
    p.add_argument("--fused", type=fused_arg, default="auto", metavar=FUSED_METAVAR,
                   help="the fused model's backend")
    p.add_argument("--device", type=device_arg, default=default_device(), help="cpu, cuda or cuda:N")
    p.add_argument("--channels-last", action="store_true", help="channels_last inputs and models")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed calls of each model, in turns")
    p.add_argument("--dtype", default="float32", choices=sorted(BENCH_DTYPES),
                   help="bfloat16 / float16: the reference under autocast against the fused model frozen in that "
                        "dtype (eval) and under autocast (training)")
    p.add_argument("--no-train", action="store_true", help="time the eval forward only")
    p.set_defaults(func=run_command, check=functools.partial(check_args, p))
    return p


# The network downsamples by 32. Smaller inputs leave 1x1 maps in several stages, whose BatchNorm
# statistics over random images are near zero: the fused and reference outputs then differ by
# rounding amplified many times, and the comparison before timing fails.
MIN_SIZE = 32
# A training step's BatchNorm normalises each channel of the last stage over batch x ceil(size / 32)^2
# values: one is an error, two or three too few for the fused and reference losses to agree.
MIN_LAST_STAGE_VALUES = 4


def check_args(parser, args):
    if not args.fused:
        parser.error("--fused off: bench compares the fused model with the reference; pick a backend or auto")
    check_fused_on_device(parser, args.fused, args.device)
    if args.dtype == "float16" and torch.device(args.device).type != "cuda":
        parser.error("--dtype float16 needs a CUDA device; on the CPU use --dtype bfloat16")
    size = args.size or VARIANTS[args.version].resolution
    if size < MIN_SIZE:
        parser.error(f"--size {size}: bench needs at least {MIN_SIZE} (the network downsamples by 32; smaller "
                     "inputs leave 1x1 maps in several stages, whose statistics make the comparison of the fused "
                     "and reference outputs meaningless)")
    values = args.batch * math.ceil(size / 32) ** 2
    if not args.no_train and values < MIN_LAST_STAGE_VALUES:
        parser.error(f"--batch {args.batch}: at --size {size} the training step needs at least "
                     f"{MIN_LAST_STAGE_VALUES} values per channel in the last stage's BatchNorm (batch x "
                     f"ceil(size / 32)^2 = {values}); raise --batch or --size, or pass --no-train")


def run_command(args, _inputs=None):
    """Eval forward (and training step) of the reference and fused models, in turns."""
    size = args.size or VARIANTS[args.version].resolution
    layout = "channels_last" if args.channels_last else "NCHW"
    print(f"{args.version}, batch {args.batch}, {size}x{size}, {layout}, {args.dtype}, {args.device}, "
          f"{torch.get_num_threads()} threads, fused={FUSED_NAMES.get(args.fused, args.fused)}; "
          f"median of {args.repeats} calls each, the models taking turns")
    rows = bench_models(args.version, args.fused, args.device, args.batch, size, args.channels_last,
                        args.repeats, train=not args.no_train, dtype=BENCH_DTYPES[args.dtype])
    print(f"{'':<18}{'reference ms':>14}{'fused ms':>10}{'speedup':>9}{'spread':>9}")
    for row in rows:
        print(f"{row.name:<18}{row.reference * 1e3:>14.1f}{row.fused * 1e3:>10.1f}{row.speedup:>8.2f}x"
              f"{row.spread * 100:>8.0f}%")
    if any(row.spread > BUSY_SPREAD for row in rows):
        print(f"warning: the timings spread by more than {BUSY_SPREAD:.0%} (slowest vs fastest call): the machine "
              "was busy; rerun on a quiet machine or with more --repeats", file=sys.stderr)
