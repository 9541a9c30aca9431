"""Small helpers shared by the ops and every backend."""
import torch

from ..kernels.layout import (as_supported_layout, conv_out_hw, conv_out_size, is_channels_last, memory_format_of,
                              tf_same_padding, tf_same_padding_2d)

__all__ = ["acc_dtype", "as_supported_layout", "conv_out_hw", "conv_out_size", "is_channels_last", "memory_format_of",
           "tf_same_padding", "tf_same_padding_2d",
           "autocast_weight", "autocast_input", "refuse_double_backward", "refuse_unsupported_transforms",
           "check_batch_stats", "REFERENCE_HINT"]


def acc_dtype(dtype):
    """Dtype of per-channel statistics and reductions for inputs of `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def autocast_weight(weight, x):
    """Under autocast, a weight in another dtype than its (autocast) input is cast to
    the input's dtype, as autocast does for a convolution's weight; the cast is
    differentiable, so the gradient reaches the original weight."""
    if weight.dtype != x.dtype and torch.is_autocast_enabled(x.device.type):
        return weight.to(x.dtype)
    return weight


REFERENCE_HINT = "model.set_fused(False) switches to the reference layers (same weights), which support it"


def refuse_double_backward(layer):
    """Called first in a fused op's backward. Grad mode is on there only under
    create_graph=True; the fused backward formulas are not differentiable
    themselves, so a second derivative would be silently wrong: refuse it."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{layer}: double backward (create_graph=True, e.g. a gradient penalty or a "
                           f"Hessian-vector product) is not supported by the fused layers; {REFERENCE_HINT}")


def refuse_unsupported_transforms(layer, x):
    """torch.func.vmap and torch.jit.trace cannot go through the fused ops; say so
    instead of failing deep inside them (torch.compile is supported)."""
    if torch.compiler.is_compiling():
        return
    if torch._C._functorch.is_batchedtensor(x):
        raise RuntimeError(f"{layer}: torch.func.vmap is not supported by the fused layers; {REFERENCE_HINT}")
    if torch.jit.is_tracing():
        raise RuntimeError(f"{layer}: torch.jit.trace cannot record the fused layers (TorchScript cannot save "
                           f"their custom ops); trace the reference model instead: {REFERENCE_HINT}")


def check_batch_stats(layer, size, eps):
    """nn.BatchNorm2d's checks before training on a batch of `size` (N, C, H, W):
    statistics need two values per channel and a positive eps."""
    if size[0] * size[2] * size[3] == 1:
        raise ValueError(f"{layer}: Expected more than 1 value per channel when training, "
                         f"got input size {torch.Size(size)}")
    if eps <= 0:
        raise ValueError(f"{layer}: batch_norm eps must be positive during training, but got {eps}")


def autocast_input(x):
    """Under autocast, a float32 input is cast to the autocast dtype, as autocast
    does for a convolution's input, so a fused layer returns the dtype the
    reference layer returns."""
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.dtype == torch.float32:
        return x.to(torch.get_autocast_dtype(device))
    return x

