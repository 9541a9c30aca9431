"""Deprecated: the layers moved to effnet_fast.nn (effnet_fast.nn.layers and
effnet_fast.nn.batch_norm). This module re-exports the old names and will be removed."""
import warnings

from .nn.batch_norm import (CPU_SYNC_BN_ERROR, SyncBatchNorm2d, affine_or_identity, batch_norm, sync_group,
                            update_running_stats)
from .nn.layers import (ConvBNAct, DWConvBNSiLU, FusedConvBNAct, FusedDWConvBNSiLU, FusedSqueezeExcitation, MBConv,
                        SqueezeExcitation, StochasticDepth, check_conv_settings)

warnings.warn("effnet_fast.layers is deprecated: import from effnet_fast.nn", DeprecationWarning, stacklevel=2)

__all__ = ["CPU_SYNC_BN_ERROR", "SyncBatchNorm2d", "affine_or_identity", "batch_norm", "sync_group",
           "update_running_stats", "ConvBNAct", "DWConvBNSiLU", "FusedConvBNAct", "FusedDWConvBNSiLU",
           "FusedSqueezeExcitation", "MBConv", "SqueezeExcitation", "StochasticDepth", "check_conv_settings"]
