"""Memory-layout helpers of the kernels and of the ops above them (plain torch: importing
this module needs no Triton)."""
import torch


def is_channels_last(x):
    """True when x is stored channels_last (and not also plain contiguous)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def memory_format_of(x):
    """torch.channels_last or torch.contiguous_format, as x is stored."""
    return torch.channels_last if is_channels_last(x) else torch.contiguous_format


def as_supported_layout(x):
    """x itself when it is contiguous or channels_last, else a contiguous copy."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous()


def conv_out_size(size, kernel_size, stride):
    """Output size of a conv with symmetric padding kernel_size // 2."""
    return (size + 2 * (kernel_size // 2) - kernel_size) // stride + 1
