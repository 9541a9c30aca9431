"""Deprecated: the model moved to effnet_fast.efficientnet (and recompute_bn_statistics to
effnet_fast.nn). This module re-exports the old names and will be removed."""
import warnings

from .efficientnet import (B0_STAGES, HEAD_CHANNELS, STEM_CHANNELS, VARIANTS, EfficientNet, Stage, Variant,
                           compound_scaling, round_channels, round_repeats, set_fused)
from .nn.batch_norm import recompute_bn_statistics

warnings.warn("effnet_fast.model is deprecated: import from effnet_fast (EfficientNet, set_fused, ...) or "
              "effnet_fast.efficientnet", DeprecationWarning, stacklevel=2)

__all__ = ["B0_STAGES", "HEAD_CHANNELS", "STEM_CHANNELS", "VARIANTS", "EfficientNet", "Stage", "Variant",
           "compound_scaling", "round_channels", "round_repeats", "set_fused", "recompute_bn_statistics"]
