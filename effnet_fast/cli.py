"""Command line: `python -m effnet_fast {info,summary,bench,train}` (or `effnet-fast ...`)."""
import argparse
import json

import torch

from .benchmark import eval_forward, median_seconds, synchronizer, train_step
from .model import VARIANTS, EfficientNet
from .ops import build_info


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


def _model_for(version, fused, device, channels_last):
    torch.manual_seed(0)
    model = EfficientNet(version, fused=fused).to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def cmd_bench(args):
    """Eval forward and training step of the reference and fused models, same run."""
    device = torch.device(args.device)
    size = args.size or VARIANTS[args.version].resolution
    x = torch.randn(args.batch, 3, size, size, device=device)
    if args.channels_last:
        x = x.to(memory_format=torch.channels_last)
    target = torch.randint(0, 1000, (args.batch,), device=device)
    sync = synchronizer(device)
    results = {}
    for label, fused in (("reference", False), ("fused", args.fused)):
        model = _model_for(args.version, fused, device, args.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        fwd = median_seconds(lambda: (eval_forward(model, x), sync()), args.repeats)
        step = median_seconds(lambda: (train_step(model, opt, x, target), sync()), args.repeats)
        results[label] = (fwd, step)
    layout = "channels_last" if args.channels_last else "NCHW"
    print(f"{args.version}, batch {args.batch}, {size}x{size}, {layout}, {device.type}, fused={args.fused!r}")
    print(f"{'':<10}{'eval fwd ms':>13}{'train step ms':>15}")
    for label, (fwd, step) in results.items():
        print(f"{label:<10}{fwd * 1e3:>13.1f}{step * 1e3:>15.1f}")
    (rf, rs), (ff, fs) = results["reference"], results["fused"]
    print(f"{'speedup':<10}{rf / ff:>12.2f}x{rs / fs:>14.2f}x")


def cmd_train(args):
    from .checkpoint import check_writable
    from .train import train_digits
    if args.out:
        try:
            check_writable(args.out)
        except OSError as exc:
            raise SystemExit(f"effnet-fast train --out: {exc}") from exc
    train_digits(version=args.version, fused=args.fused, epochs=args.epochs, batch_size=args.batch,
                 size=args.size or 32, out=args.out, limit=args.limit)


def _fused_arg(value):
    return {"false": False, "true": True}.get(value.lower(), value)


def build_parser():
    parser = argparse.ArgumentParser(prog="effnet-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="which backends are built").set_defaults(func=cmd_info)

    p = sub.add_parser("summary", help="variants B0-B7 beside the paper's table, and a forward pass")
    p.add_argument("versions", nargs="*", choices=sorted(VARIANTS) + [[]], default=None)
    p.add_argument("--size", type=int, help="forward-pass input size (default: the variant's resolution)")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("bench", help="time the reference and fused models")
    p.add_argument("--version", default="b0", choices=sorted(VARIANTS))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, help="input size (default: the variant's resolution)")
    p.add_argument("--fused", type=_fused_arg, default=True, help="True or a backend name")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("train", help="train on the scikit-learn digits data set (no download)")
    p.add_argument("--version", default="b0", choices=sorted(VARIANTS))
    p.add_argument("--fused", type=_fused_arg, default=False, help="False, True or a backend name")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, help="input size (default 32)")
    p.add_argument("--limit", type=int, help="use at most this many training and test images")
    p.add_argument("--out", help="save the trained weights here")
    p.set_defaults(func=cmd_train)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
