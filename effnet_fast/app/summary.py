"""`effnet-fast summary`: parameters and multiply-adds of each variant, set beside the
papers' tables, and a forward pass."""
import functools

import torch
from torch import nn

from ..efficientnet import VARIANTS, EfficientNet
from .args import HelpFormatter, positive_int

# The papers' tables: parameters (millions), FLOPs (multiply-adds, billions) and ImageNet
# top-1. V1: Tan & Le 2019, Table 2; V2: Tan & Le 2021, Table 7 (S at 384 px, M and L at
# 480). timm's efficientnetv2_rw_s is not in the paper.
PAPER = {"b0": (5.3, 0.39, 77.1), "b1": (7.8, 0.70, 79.1), "b2": (9.2, 1.0, 80.1), "b3": (12, 1.8, 81.6),
         "b4": (19, 4.2, 82.9), "b5": (30, 9.9, 83.6), "b6": (43, 19.0, 84.0), "b7": (66, 37.0, 84.3),
         "v2_s": (22, 8.8, 83.9), "v2_m": (54, 24.0, 85.1), "v2_l": (120, 53.0, 85.7)}
NOT_IN_PAPER = (None, None, None)


def count_macs(model, resolution=None):
    """Multiply-adds of one image through convolutions and linear layers, counted on
    the meta device (no compute, no memory)."""
    resolution = resolution or model.resolution
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            total += output.numel() * (module.in_channels // module.groups) * k
        elif isinstance(module, nn.Linear):
            total += module.in_features * module.out_features

    meta_model = _meta_copy(model)
    handles = [m.register_forward_hook(hook) for m in meta_model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        meta_model.eval()(torch.empty(1, model.in_channels, resolution, resolution, device="meta"))
    for h in handles:
        h.remove()
    return total


def _meta_copy(model):
    rebuilt = EfficientNet(model.version, model.classifier.out_features, width=model.width, depth=model.depth,
                           resolution=model.resolution, in_channels=model.in_channels)
    return rebuilt.to("meta")


def variant_table(versions=None):
    """Rows of (version, width, depth, resolution, params, GMACs, paper params (M),
    paper GMACs, paper top-1); the paper's values are None where it has none."""
    rows = []
    for v in versions or sorted(VARIANTS):
        model = EfficientNet(v)
        spec = VARIANTS[v]
        params = sum(p.numel() for p in model.parameters())
        rows.append((v, spec.width, spec.depth, spec.resolution, params, count_macs(model) / 1e9,
                     *PAPER.get(v, NOT_IN_PAPER)))
    return rows


def _paper(value, fmt, unit=""):
    return "-" if value is None else format(value, fmt) + unit


def format_variant_table(rows):
    head = (f"{'model':<8}{'width':>6}{'depth':>6}{'res':>5}{'params':>13}{'GMACs':>8}{'paper params':>14}"
            f"{'paper GMACs':>13}{'paper top-1':>13}")
    lines = [head, "-" * len(head)]
    for v, w, d, r, p, macs, paper_params, paper_macs, top1 in rows:
        lines.append(f"{v:<8}{w:>6.1f}{d:>6.1f}{r:>5}{p:>13,}{macs:>8.2f}{_paper(paper_params, 'g', 'M'):>14}"
                     f"{_paper(paper_macs, '.2f'):>13}{_paper(top1, '.1f'):>13}")
    return "\n".join(lines)


def add_command(sub):
    """The `summary` subcommand of the command line."""
    p = sub.add_parser("summary", formatter_class=HelpFormatter,
                       help="variants B0-B7 and V2 beside the papers' tables, and a forward pass")
    p.add_argument("versions", nargs="*", metavar="VERSION", help=f"variants to list ({', '.join(sorted(VARIANTS))}); "
                   "default: all")
    p.add_argument("--size", type=positive_int, help="forward-pass input size (default: the variant's resolution)")
    p.set_defaults(func=run_command, check=functools.partial(check_args, p))
    return p


def check_args(parser, args):
    unknown = [v for v in args.versions if v not in VARIANTS]
    if unknown:
        parser.error(f"summary: unknown variant(s) {', '.join(unknown)}; choose from {', '.join(sorted(VARIANTS))}")


def run_command(args, _inputs=None):
    print(format_variant_table(variant_table(args.versions)))
    model = EfficientNet(args.versions[0] if args.versions else "b0").eval()
    size = args.size or model.resolution
    with torch.no_grad():
        out = model(torch.randn(1, 3, size, size))
    print(f"\nforward pass: {model.version} on a 1x3x{size}x{size} input -> {tuple(out.shape)}")
