"""torch.library.opcheck on the kernel-level ops of csrc/op_schemas.h, for the C++
CPU kernels and the CUDA emulation (the differentiable ops are opchecked in
test_dwconv_bn_silu.py and test_squeeze_excite.py, every backend)."""
import pytest
import torch

from effnet_fast.ops.backends import cpu_built, cuda_emu_built

NAMESPACES = [
    pytest.param("effnet_fast", marks=pytest.mark.skipif(not cpu_built(), reason="effnet_fast._C not built")),
    pytest.param("effnet_fast_emu", marks=pytest.mark.skipif(not cuda_emu_built(), reason="_C_emu not built")),
]


def kernel_op_cases(channels_last):
    torch.manual_seed(0)
    n, c, h, w = 2, 4, 6, 5
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(n, c, h, w).contiguous(memory_format=fmt)
    wt = torch.randn(c, 1, 3, 3)
    scale, shift, mean, a, b, cc = (torch.randn(c) for _ in range(6))
    g1 = torch.randn(n, c, h, w).contiguous(memory_format=fmt)
    g2 = torch.randn(n, c, 3, 3).contiguous(memory_format=fmt)
    gate, bias = torch.rand(n, c), torch.randn(n, c)
    return {
        "dwconv_bn_silu_stats": [(x, wt, 1), (x, wt, 2)],
        "dwconv_bn_silu_forward": [(x, wt, scale, shift, 1), (x, wt, scale, shift, 2)],
        "dwconv_bn_silu_backward_reduce": [(g1, x, wt, scale, shift, mean, 1), (g2, x, wt, scale, shift, mean, 2)],
        "dwconv_bn_silu_backward": [(g1, x, wt, scale, shift, a, b, cc, 1), (g2, x, wt, scale, shift, a, b, cc, 2)],
        "se_pool": [(x,)],
        "se_scale": [(x, gate, None), (x, gate, bias)],
        "se_gate_grad": [(g1, x)],
        "bn_silu_stats": [(x,)],
        "bn_silu_forward": [(x, scale, shift)],
        "bn_silu_backward_reduce": [(g1, x, scale, shift, mean)],
        "bn_silu_backward": [(g1, x, scale, shift, a, b, cc)],
    }


OP_NAMES = list(kernel_op_cases(False))


@pytest.mark.parametrize("namespace", NAMESPACES)
@pytest.mark.parametrize("op_name", OP_NAMES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_kernel_op_opcheck(namespace, op_name, channels_last):
    if not hasattr(getattr(torch.ops, namespace), op_name):
        pytest.skip(f"{namespace}::{op_name} is not in this build")
    op = getattr(getattr(torch.ops, namespace), op_name).default
    for args in kernel_op_cases(channels_last)[op_name]:
        torch.library.opcheck(op, args)
