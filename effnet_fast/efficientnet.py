"""EfficientNet B0-B7 (Tan & Le, 2019) and EfficientNetV2 S/M/L (Tan & Le, 2021), described
as data and built by a small builder."""
import math
from dataclasses import dataclass

import torch
from torch import nn

from .nn.layers import (BN_EPS_MARKER, PADDINGS, ConvBNAct, DWConvBNSiLU, FusedConvBNAct, FusedDWConvBNSiLU,
                        FusedMBConv, FusedSqueezeExcitation, MBConv, SqueezeExcitation)
from .ops.backends import check_fused_setting
from .pretrained import from_pretrained

# The block kinds of a stage: "mbconv" (1x1 expand, depthwise, squeeze-excitation, 1x1
# project), "fused_mbconv" (V2: one k x k conv, 1x1 project) and "conv" (V2: one k x k
# conv + BN + SiLU, torchvision's Fused-MBConv with expand ratio 1, timm's ConvBnAct).
BLOCK_KINDS = ("mbconv", "fused_mbconv", "conv")


@dataclass(frozen=True)
class Stage:
    expand_ratio: int
    channels: int
    repeats: int
    stride: int
    kernel_size: int
    block: str = "mbconv"


# B0, the base network found by the architecture search.
B0_STAGES = (
    Stage(1, 16, 1, 1, 3),
    Stage(6, 24, 2, 2, 3),
    Stage(6, 40, 2, 2, 5),
    Stage(6, 80, 3, 2, 3),
    Stage(6, 112, 3, 1, 5),
    Stage(6, 192, 4, 2, 5),
    Stage(6, 320, 1, 1, 3),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280

# EfficientNetV2 as torchvision builds it (the paper's Table 4 for S; M and L from the
# reference code): Fused-MBConv in the early stages, MBConv with SE 0.25 after.
V2_S_STAGES = (
    Stage(1, 24, 2, 1, 3, "conv"),
    Stage(4, 48, 4, 2, 3, "fused_mbconv"),
    Stage(4, 64, 4, 2, 3, "fused_mbconv"),
    Stage(4, 128, 6, 2, 3),
    Stage(6, 160, 9, 1, 3),
    Stage(6, 256, 15, 2, 3),
)
V2_M_STAGES = (
    Stage(1, 24, 3, 1, 3, "conv"),
    Stage(4, 48, 5, 2, 3, "fused_mbconv"),
    Stage(4, 80, 5, 2, 3, "fused_mbconv"),
    Stage(4, 160, 7, 2, 3),
    Stage(6, 176, 14, 1, 3),
    Stage(6, 304, 18, 2, 3),
    Stage(6, 512, 5, 1, 3),
)
V2_L_STAGES = (
    Stage(1, 32, 4, 1, 3, "conv"),
    Stage(4, 64, 7, 2, 3, "fused_mbconv"),
    Stage(4, 96, 7, 2, 3, "fused_mbconv"),
    Stage(4, 192, 10, 2, 3),
    Stage(6, 224, 19, 1, 3),
    Stage(6, 384, 25, 2, 3),
    Stage(6, 640, 7, 1, 3),
)
# timm's efficientnetv2_rw_s, drawn from the paper's figure before the official release:
# a projection in the first stage, 272 channels last and a 1792-channel head.
V2_RW_S_STAGES = (Stage(1, 24, 2, 1, 3, "fused_mbconv"), *V2_S_STAGES[1:5], Stage(6, 272, 15, 2, 3))


@dataclass(frozen=True)
class Variant:
    width: float
    depth: float
    resolution: int
    dropout: float
    bn_eps: float = 1e-5
    bn_momentum: float = 0.1
    stages: tuple = B0_STAGES
    stem: int = STEM_CHANNELS
    head: int = HEAD_CHANNELS


# The official (width, depth, resolution, dropout), set by hand in the reference code.
# BatchNorm settings follow torchvision: PyTorch defaults for B0-B4, eps 1e-3 and
# momentum 0.01 for B5-B7.
VARIANTS = {
    "b0": Variant(1.0, 1.0, 224, 0.2),
    "b1": Variant(1.0, 1.1, 240, 0.2),
    "b2": Variant(1.1, 1.2, 260, 0.3),
    "b3": Variant(1.2, 1.4, 300, 0.3),
    "b4": Variant(1.4, 1.8, 380, 0.4),
    "b5": Variant(1.6, 2.2, 456, 0.4, 1e-3, 0.01),
    "b6": Variant(1.8, 2.6, 528, 0.5, 1e-3, 0.01),
    "b7": Variant(2.0, 3.1, 600, 0.5, 1e-3, 0.01),
    # V2 is not compound-scaled from one base: each size has its own table. BatchNorm eps
    # 1e-3 as torchvision; the resolution is the evaluation size of torchvision's weights.
    "v2_s": Variant(1.0, 1.0, 384, 0.2, 1e-3, stages=V2_S_STAGES, stem=24),
    "v2_m": Variant(1.0, 1.0, 480, 0.3, 1e-3, stages=V2_M_STAGES, stem=24),
    "v2_l": Variant(1.0, 1.0, 480, 0.4, 1e-3, stages=V2_L_STAGES, stem=32),
    "v2_rw_s": Variant(1.0, 1.0, 384, 0.2, stages=V2_RW_S_STAGES, stem=24, head=1792),
}
# The TF ports (padding="same", timm's tf_efficientnet_b*) keep TensorFlow's BatchNorm eps.
TF_BN_EPS = 1e-3


def round_channels(channels, width, divisor=8):
    """Scale a channel count by `width` and round to a multiple of `divisor`,
    never more than 10% below the exact value."""
    exact = channels * width
    rounded = max(divisor, int(exact + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * exact:
        rounded += divisor
    return rounded


def round_repeats(repeats, depth):
    return int(math.ceil(repeats * depth))


def compound_scaling(phi, alpha=1.2, beta=1.1, gamma=1.15, base_resolution=224):
    """The paper's compound scaling: depth alpha**phi, width beta**phi and
    resolution gamma**phi, with alpha * beta**2 * gamma**2 close to 2 so that
    each unit of phi about doubles the FLOPs. Returns (width, depth, resolution)."""
    return beta ** phi, alpha ** phi, int(round(base_resolution * gamma ** phi))


class EfficientNet(nn.Module):
    """EfficientNet B0-B7 and EfficientNetV2.

    version: "b0".."b7", "v2_s", "v2_m", "v2_l" (torchvision's efficientnet_v2_*, timm's
      tf_efficientnetv2_* with padding="same") or "v2_rw_s" (timm's efficientnetv2_rw_s),
      case-insensitive; or None with width/depth/resolution given (a model scaled from B0,
      see `EfficientNet.from_phi`).
    fused: False for the pure-PyTorch layers; True (or "auto") for the fastest built
      backend of the input's device; "cpu", "cuda" or "triton" to force one.
    padding: "symmetric" (k // 2 on every side, as torchvision and timm's efficientnet_b*)
      or "same", TensorFlow's 'same' padding computed from each input's size (asymmetric
      for the stride-2 convs on even sizes) with BatchNorm eps 1e-3: the variant of the
      original TF weights, timm's tf_efficientnet_b0..b7.
    Other arguments override the variant's defaults. A model whose BatchNorm eps is not its
      variant's default records it in its state dict (key "bn_eps"), so that its weights
      load only into a model with the same eps (effnet_fast.convert.load_weights says which).
    """

    def __init__(self, version="b0", num_classes=1000, fused=False, *, width=None, depth=None,
                 resolution=None, dropout=None, stochastic_depth=0.2, bn_eps=None, bn_momentum=None,
                 in_channels=3, padding="symmetric"):
        super().__init__()
        if version is not None:
            key = str(version).lower()
            if key not in VARIANTS:
                raise ValueError(f"unknown EfficientNet version {version!r}; choose one of {sorted(VARIANTS)}")
            base = VARIANTS[key]
        else:
            if width is None or depth is None:
                raise ValueError("a custom EfficientNet (version=None) needs width and depth")
            base = Variant(width, depth, resolution or 224, 0.2)
        check_fused_setting(fused)
        if padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS} ('same': TensorFlow's, for the TF weights), "
                             f"got {padding!r}")
        self.version = None if version is None else key
        self.padding = padding
        self.width = width if width is not None else base.width
        self.depth = depth if depth is not None else base.depth
        self.resolution = resolution if resolution is not None else base.resolution
        self.in_channels = in_channels
        self.stages = base.stages
        default_eps = TF_BN_EPS if padding == "same" else base.bn_eps
        bn = dict(bn_eps=default_eps if bn_eps is None else bn_eps,
                  bn_momentum=base.bn_momentum if bn_momentum is None else bn_momentum)
        if bn["bn_eps"] != default_eps:  # recorded in the state dict: see BN_EPS_MARKER
            self.register_buffer(BN_EPS_MARKER, torch.tensor(float(bn["bn_eps"]), dtype=torch.float64))

        stem = round_channels(base.stem, self.width)
        self.stem = ConvBNAct(in_channels, stem, 3, stride=2, padding=padding, **bn)
        self.blocks = self._build_blocks(stem, stochastic_depth, bn)
        last = round_channels(self.stages[-1].channels, self.width)
        head = round_channels(base.head, self.width)
        self.head = ConvBNAct(last, head, 1, **bn)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(base.dropout if dropout is None else dropout, inplace=True)
        self.classifier = nn.Linear(head, num_classes)
        self._init_weights()
        self.fused = False
        if fused:
            self.set_fused(fused)

    def _build_blocks(self, in_channels, stochastic_depth, bn):
        total = sum(round_repeats(s.repeats, self.depth) for s in self.stages)
        stages, index = [], 0
        for spec in self.stages:
            out_channels = round_channels(spec.channels, self.width)
            blocks = []
            for j in range(round_repeats(spec.repeats, self.depth)):
                blocks.append(_block(spec, in_channels, out_channels, spec.stride if j == 0 else 1,
                                     stochastic_depth * index / total, padding=self.padding, **bn))
                in_channels, index = out_channels, index + 1
            stages.append(nn.Sequential(*blocks))
        return nn.Sequential(*stages)

    def _init_weights(self):
        # As torchvision: He (fan-out) for convs, uniform(1/sqrt(out)) for the classifier.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    @classmethod
    def from_phi(cls, phi, num_classes=1000, alpha=1.2, beta=1.1, gamma=1.15, **kwargs):
        """A custom model scaled from B0 by the compound coefficient phi."""
        width, depth, resolution = compound_scaling(phi, alpha, beta, gamma)
        return cls(None, num_classes, width=width, depth=depth, resolution=resolution, **kwargs)

    @classmethod
    def from_pretrained(cls, name, fused=False, file=None):
        """The model with pretrained weights in one line, through torchvision's weights API or
        timm's hub ("torchvision:efficientnet_b0.IMAGENET1K_V1", "timm:tf_efficientnet_b7.ns_jft_in1k";
        see effnet_fast.pretrained), in eval mode, its preprocessing in `model.pretrained`."""
        return from_pretrained(cls, name, fused=fused, file=file)

    def set_fused(self, fused):
        """Switch to the fused ops (`fused` True or a backend name) or back to the
        reference layers (False), in place; see `set_fused`."""
        return set_fused(self, fused)

    def mbconv_blocks(self):
        """The residual blocks in order: MBConv, and V2's FusedMBConv."""
        return [m for m in self.modules() if isinstance(m, (MBConv, FusedMBConv))]

    def forward_features(self, x):
        if x.dim() != 4:
            raise ValueError(f"EfficientNet expects a 4-D (N, C, H, W) input, got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"EfficientNet expects {self.in_channels} input channels, got {x.shape[1]} "
                             f"(input shape {tuple(x.shape)})")
        return self.head(self.blocks(self.stem(x)))

    def forward(self, x):
        x = self.pool(self.forward_features(x)).flatten(1)
        return self.classifier(self.dropout(x))

    def extra_repr(self):
        return (f"version={self.version!r}, width={self.width}, depth={self.depth}, "
                f"resolution={self.resolution}, padding={self.padding!r}, fused={self.fused!r}")


def _block(spec, in_channels, out_channels, stride, drop_prob, **kwargs):
    """One block of stage `spec` (see BLOCK_KINDS)."""
    if spec.block not in BLOCK_KINDS:
        raise ValueError(f"unknown block kind {spec.block!r}; choose one of {BLOCK_KINDS}")
    if spec.block == "mbconv":
        return MBConv(in_channels, out_channels, spec.expand_ratio, spec.kernel_size, stride, drop_prob, **kwargs)
    return FusedMBConv(in_channels, out_channels, spec.expand_ratio, spec.kernel_size, stride, drop_prob,
                       project=spec.block == "fused_mbconv", **kwargs)


_FUSED = {DWConvBNSiLU: FusedDWConvBNSiLU, SqueezeExcitation: FusedSqueezeExcitation, ConvBNAct: FusedConvBNAct}
_REFERENCE = {fused: ref for ref, fused in _FUSED.items()}


def set_fused(module, fused):
    """Swap, in place, every depthwise conv-BN-SiLU and squeeze-excitation layer below
    `module` for its fused version on backend `fused` (True or a name), or back to
    the reference layer (False). Parameters and buffers are shared, so state_dict
    keys do not change. The fused model also keeps only the conv output of each
    1x1 conv + BN + SiLU for backward (recomputing BN + SiLU), saving memory."""
    check_fused_setting(fused)
    for model in module.modules():
        if isinstance(model, EfficientNet):
            model.fused = fused or False  # also when `module` merely wraps the model
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            ref_cls = _REFERENCE.get(type(child), type(child))
            if ref_cls in _FUSED:
                setattr(parent, name, _swap(child, _FUSED[ref_cls] if fused else ref_cls, fused))
    return module


def _swap(module, cls, backend):
    """`module` as an instance of `cls`, sharing its parameters and buffers."""
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    new.__dict__.pop("backend", None)
    if backend and cls in (FusedConvBNAct, FusedDWConvBNSiLU, FusedSqueezeExcitation):
        new.backend = backend
    return new
