"""effnet_fast: EfficientNet B0-B7 with fused kernels for its hot layers."""
from .convert import load_weights, to_layout
from .distributed import convert_sync_batchnorm
from .freeze import freeze
from .efficientnet import VARIANTS, EfficientNet, compound_scaling, round_channels, round_repeats, set_fused
from .ops.backends import BACKENDS, build_info
from .patch import PatchReport, patch, unpatch

__version__ = "0.1.0"
__all__ = ["EfficientNet", "VARIANTS", "compound_scaling", "round_channels", "round_repeats", "set_fused", "BACKENDS",
           "build_info", "patch", "unpatch", "PatchReport", "convert_sync_batchnorm", "load_weights", "to_layout", "freeze",
           "__version__"]
