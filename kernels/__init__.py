"""Triton kernels for effnet_fast, shipped as effnet_fast.kernels.

Exports the kernel-level ops of csrc/op_schemas.h with the same signatures, as torch custom
ops (namespace effnet_fast_triton) so that graphs calling them can be traced. They run on
CUDA tensors, or on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1, set
before the ops are first used). Imports nothing from effnet_fast: the package is the
bottom layer, loaded by effnet_fast.ops.backends; its `layout` module (plain torch) serves
the ops above too."""
import importlib

_KERNEL_OPS = ("dwconv_bn_silu_stats", "dwconv_bn_silu_forward", "dwconv_bn_silu_backward_reduce",
               "dwconv_bn_silu_backward", "bn_silu_stats", "bn_silu_forward", "bn_silu_backward_reduce",
               "bn_silu_backward", "se_pool", "se_scale", "se_gate_grad")
__all__ = ["NAMESPACE", *_KERNEL_OPS]


def __getattr__(name):
    # Loaded on first use, so that the plain-torch `layout` module imports without Triton.
    if name in __all__:
        value = getattr(importlib.import_module(".ops", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
