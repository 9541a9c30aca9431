"""Command line: `python -m effnet_fast {info,summary,bench,train,predict,export}` (or `effnet-fast ...`).

Bad values are refused by the parser (exit code 2, a message naming the option); each
command module adds its own subcommand with `add_command(subparsers)`."""
import argparse
import functools
import importlib
import json
import os
import sys

import torch

from .efficientnet import VARIANTS, EfficientNet
from .ops import build_info

# Values of --fused: the model's `fused` argument they mean.
FUSED_CHOICES = {"off": False, "false": False, "auto": True, "true": True, "cpu": "cpu", "cuda": "cuda",
                 "triton": "triton", "reference": "reference"}
FUSED_NAMES = {False: "off", True: "auto"}
# Timing spread (slowest / fastest call - 1) above which a bench warns that the machine was busy.
BUSY_SPREAD = 0.25
# Modules that add a subcommand of their own (each has add_command(subparsers)).
COMMAND_MODULES = ("train", "predict", "export")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults and keeps the descriptions' line breaks; no "(default: None)" after
    options whose help says what their absence means."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def int_at_least(minimum):
    """An argparse type: an integer >= minimum."""
    def parse(value):
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value!r}") from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {number}")
        return number
    parse.__name__ = f"integer >= {minimum}"
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def fused_arg(value):
    """--fused off|auto|cpu|cuda|triton (true/false accepted) -> the model's `fused`."""
    key = value.lower()
    if key not in FUSED_CHOICES:
        names = "off, auto, cpu, cuda, triton (or true/false)"
        raise argparse.ArgumentTypeError(f"unknown backend {value!r}; choose one of {names}")
    return FUSED_CHOICES[key]


def device_arg(value):
    try:
        device = torch.device(value)
    except RuntimeError as exc:
        raise argparse.ArgumentTypeError(f"not a device: {value!r} ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{value!r}: no CUDA device is available (torch.cuda.is_available() is False)")
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{value!r}: effnet_fast runs on 'cpu' or 'cuda' devices")
    return device


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_fused_on_device(parser, fused, device):
    """parser.error (exit 2) when the --fused backend cannot run on --device."""
    if not fused:
        return
    from .ops.backends import resolve_backend
    try:
        resolve_backend(fused, device)
    except (RuntimeError, ValueError) as exc:
        parser.error(f"--fused {fused if isinstance(fused, str) else 'auto'} on --device {device}: {exc}")


def cmd_info(args):
    print(json.dumps(build_info(), indent=2))


def cmd_summary(args):
    from .summary import format_variant_table, variant_table
    print(format_variant_table(variant_table(args.versions)))
    model = EfficientNet(args.versions[0] if args.versions else "b0").eval()
    size = args.size or model.resolution
    with torch.no_grad():
        out = model(torch.randn(1, 3, size, size))
    print(f"\nforward pass: {model.version} on a 1x3x{size}x{size} input -> {tuple(out.shape)}")


def cmd_bench(args):
    """Eval forward (and training step) of the reference and fused models, in turns."""
    from .benchmark import bench_models
    size = args.size or VARIANTS[args.version].resolution
    layout = "channels_last" if args.channels_last else "NCHW"
    print(f"{args.version}, batch {args.batch}, {size}x{size}, {layout}, {args.device}, "
          f"{torch.get_num_threads()} threads, fused={FUSED_NAMES.get(args.fused, args.fused)}; "
          f"median of {args.repeats} calls each, the models taking turns")
    rows = bench_models(args.version, args.fused, args.device, args.batch, size, args.channels_last,
                        args.repeats, train=not args.no_train)
    print(f"{'':<18}{'reference ms':>14}{'fused ms':>10}{'speedup':>9}{'spread':>9}")
    for row in rows:
        print(f"{row.name:<18}{row.reference * 1e3:>14.1f}{row.fused * 1e3:>10.1f}{row.speedup:>8.2f}x"
              f"{row.spread * 100:>8.0f}%")
    if any(row.spread > BUSY_SPREAD for row in rows):
        print(f"warning: the timings spread by more than {BUSY_SPREAD:.0%} (slowest vs fastest call): the machine "
              "was busy; rerun on a quiet machine or with more --repeats", file=sys.stderr)


def add_bench_command(sub):
    p = sub.add_parser("bench", formatter_class=HelpFormatter,
                       help="time the reference and fused models (eval forward and training step)",
                       description="The reference and the fused model take turns; BN statistics are calibrated "
                                   "first and\nthe outputs compared before timing.")
    p.add_argument("--version", default="b0", choices=sorted(VARIANTS), help="variant")
    p.add_argument("--batch", type=positive_int, default=16, help="batch size")
    p.add_argument("--size", type=positive_int, help="input size (default: the variant's resolution)")
    p.add_argument("--fused", type=fused_arg, default="auto", metavar="{off,auto,cpu,cuda,triton}",
                   help="the fused model's backend")
    p.add_argument("--device", type=device_arg, default=default_device(), help="cpu, cuda or cuda:N")
    p.add_argument("--channels-last", action="store_true", help="channels_last inputs and models")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed calls of each model, in turns")
    p.add_argument("--no-train", action="store_true", help="time the eval forward only")
    p.set_defaults(func=cmd_bench, check=functools.partial(_check_bench, p))
    return p


def _check_bench(parser, args):
    if not args.fused:
        parser.error("--fused off: bench compares the fused model with the reference; pick a backend or auto")
    check_fused_on_device(parser, args.fused, args.device)


def build_parser():
    parser = argparse.ArgumentParser(prog="effnet-fast", description=__doc__, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="which backends are built, and whether a CUDA device is there",
                   formatter_class=HelpFormatter).set_defaults(func=cmd_info)

    p = sub.add_parser("summary", formatter_class=HelpFormatter,
                       help="variants B0-B7 beside the paper's table, and a forward pass")
    p.add_argument("versions", nargs="*", metavar="VERSION", help=f"variants to list ({', '.join(sorted(VARIANTS))}); "
                   "default: all")
    p.add_argument("--size", type=positive_int, help="forward-pass input size (default: the variant's resolution)")
    p.set_defaults(func=cmd_summary, check=functools.partial(_check_summary, p))

    add_bench_command(sub)
    for name in COMMAND_MODULES:
        importlib.import_module(f".{name}", __package__).add_command(sub)
    return parser


def _check_summary(parser, args):
    unknown = [v for v in args.versions if v not in VARIANTS]
    if unknown:
        parser.error(f"summary: unknown variant(s) {', '.join(unknown)}; choose from {', '.join(sorted(VARIANTS))}")


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check = getattr(args, "check", None)
    if check is not None:
        check(args)
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        args.func(args)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`effnet-fast info | head`): stop quietly, as Unix tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(1)


if __name__ == "__main__":
    main()
