"""Modules: the reference layers of EfficientNet, their Fused* versions (same parameters,
buffers and state_dict keys), the BatchNorm adapter of the fused ops, and the frozen
inference modules (every BatchNorm folded; built by effnet_fast.freeze). FusedMBConv is
EfficientNetV2's block of that name (a regular conv where MBConv has expand + depthwise),
not a fused-kernel layer: set_fused fuses its ConvBNActs."""
from .batch_norm import SyncBatchNorm2d, bn_silu, recompute_bn_statistics
from .layers import (Conv2dSame, ConvBNAct, DWConvBNSiLU, FusedConvBNAct, FusedDWConvBNSiLU, FusedMBConv,
                     FusedSqueezeExcitation, MBConv, SqueezeExcitation, StochasticDepth)

__all__ = ["Conv2dSame", "ConvBNAct", "DWConvBNSiLU", "FusedConvBNAct", "FusedDWConvBNSiLU", "FusedMBConv",
           "FusedSqueezeExcitation", "MBConv", "SqueezeExcitation", "StochasticDepth", "SyncBatchNorm2d", "bn_silu",
           "recompute_bn_statistics"]
