"""Modules: the reference layers of EfficientNet, their Fused* versions (same parameters,
buffers and state_dict keys), the BatchNorm adapter of the fused ops, and the frozen
inference modules (every BatchNorm folded; built by effnet_fast.freeze)."""
from .batch_norm import SyncBatchNorm2d, bn_silu, recompute_bn_statistics
from .layers import (Conv2dSame, ConvBNAct, DWConvBNSiLU, FusedConvBNAct, FusedDWConvBNSiLU, FusedSqueezeExcitation, MBConv,
                     SqueezeExcitation, StochasticDepth)

__all__ = ["Conv2dSame", "ConvBNAct", "DWConvBNSiLU", "FusedConvBNAct", "FusedDWConvBNSiLU", "FusedSqueezeExcitation", "MBConv",
           "SqueezeExcitation", "StochasticDepth", "SyncBatchNorm2d", "bn_silu", "recompute_bn_statistics"]
