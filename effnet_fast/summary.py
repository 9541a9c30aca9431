"""Model summaries: parameters and multiply-adds, set beside the paper's table."""
import torch
from torch import nn

from .efficientnet import VARIANTS, EfficientNet

# The paper's Table 2: FLOPs (multiply-adds, billions) and ImageNet top-1.
PAPER = {"b0": (0.39, 77.1), "b1": (0.70, 79.1), "b2": (1.0, 80.1), "b3": (1.8, 81.6),
         "b4": (4.2, 82.9), "b5": (9.9, 83.6), "b6": (19.0, 84.0), "b7": (37.0, 84.3)}


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
    """Rows of (version, width, depth, resolution, params, GMACs, paper GMACs, paper top-1)."""
    rows = []
    for v in versions or sorted(VARIANTS):
        model = EfficientNet(v)
        spec = VARIANTS[v]
        params = sum(p.numel() for p in model.parameters())
        rows.append((v, spec.width, spec.depth, spec.resolution, params, count_macs(model) / 1e9, *PAPER[v]))
    return rows


def format_variant_table(rows):
    head = f"{'model':<6}{'width':>6}{'depth':>6}{'res':>5}{'params':>13}{'GMACs':>8}{'paper GMACs':>13}{'paper top-1':>13}"
    lines = [head, "-" * len(head)]
    for v, w, d, r, p, macs, paper_macs, top1 in rows:
        lines.append(f"{v:<6}{w:>6.1f}{d:>6.1f}{r:>5}{p:>13,}{macs:>8.2f}{paper_macs:>13.2f}{top1:>13.1f}")
    return "\n".join(lines)
