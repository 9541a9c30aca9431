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


def conv_out_size(size, kernel_size, stride, padding=None):
    """Output size of a conv padded by (before, after) zeros, or by kernel_size // 2 on
    each side when `padding` is None."""
    before, after = (kernel_size // 2, kernel_size // 2) if padding is None else padding
    return (size + before + after - kernel_size) // stride + 1


def conv_out_hw(height, width, kernel_size, stride, padding=None):
    """(H_out, W_out) of a k x k conv padded by (top, bottom, left, right) zeros, or by
    kernel_size // 2 on every side when `padding` is None."""
    if padding is None:
        return conv_out_size(height, kernel_size, stride), conv_out_size(width, kernel_size, stride)
    top, bottom, left, right = padding
    return (conv_out_size(height, kernel_size, stride, (top, bottom)),
            conv_out_size(width, kernel_size, stride, (left, right)))


def tf_same_padding(size, kernel_size, stride, dilation=1):
    """(before, after) zeros of TensorFlow's 'same' padding along one dim of `size`:
    the output has ceil(size / stride) positions, and an odd total pads one more after
    (timm's Conv2dSame, computed at run time because it depends on the input size)."""
    total = max((-(-size // stride) - 1) * stride + (kernel_size - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def tf_same_padding_2d(height, width, kernel_size, stride, dilation=1):
    """(top, bottom, left, right) of TensorFlow's 'same' padding for a square kernel."""
    return (*tf_same_padding(height, kernel_size, stride, dilation),
            *tf_same_padding(width, kernel_size, stride, dilation))
