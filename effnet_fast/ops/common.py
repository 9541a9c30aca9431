"""Small helpers shared by the ops and every backend."""
import torch


def acc_dtype(dtype):
    """Dtype of per-channel statistics and reductions for inputs of `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def is_channels_last(x):
    """True when x is stored channels_last (and not also plain contiguous)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def memory_format_of(x):
    return torch.channels_last if is_channels_last(x) else torch.contiguous_format


def as_supported_layout(x):
    """x itself when it is contiguous or channels_last, else a contiguous copy."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous()


def conv_out_size(size, kernel_size, stride):
    """Output size of a conv with symmetric padding kernel_size // 2."""
    return (size + 2 * (kernel_size // 2) - kernel_size) // stride + 1


def autocast_weight(weight, x):
    """Under autocast, a weight in another dtype than its (autocast) input is cast to
    the input's dtype, as autocast does for a convolution's weight; the cast is
    differentiable, so the gradient reaches the original weight."""
    if weight.dtype != x.dtype and torch.is_autocast_enabled(x.device.type):
        return weight.to(x.dtype)
    return weight
