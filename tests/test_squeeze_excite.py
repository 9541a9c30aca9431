"""Fused squeeze-excitation against the pure-PyTorch layer, every backend."""
import pytest
import torch

from backend_cases import GRADCHECK_BACKENDS, assert_close, backend_params, forward_backward_pair
from effnet_fast.nn import FusedSqueezeExcitation, SqueezeExcitation
from effnet_fast.ops import kernels, squeeze_excite, squeeze_excite_project
from effnet_fast.ops.common import acc_dtype

# (N, C, C_reduced, H, W): B0-like widths scaled down, odd and 1x1 planes, batch 1.
CASES = [(2, 16, 4, 9, 9), (1, 24, 6, 7, 5), (3, 8, 2, 1, 1), (2, 40, 10, 4, 3)]
CUDA_CASES = [(8, 96, 4, 112, 112), (8, 240, 10, 28, 28), (8, 1152, 48, 7, 7)]


def make_pair(c, cr, dtype, device, backend):
    acc = acc_dtype(dtype)
    ref = SqueezeExcitation(c, cr).to(device, acc)
    fused = FusedSqueezeExcitation(c, cr, backend=backend).to(device, dtype)
    fused.load_state_dict(ref.state_dict())
    ref.load_state_dict({k: v.to(acc) for k, v in fused.state_dict().items()})
    return ref, fused


@pytest.mark.parametrize("backend,device,dtype", backend_params(with_dtypes=True))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_matches_reference(backend, device, dtype, channels_last):
    torch.manual_seed(0)
    for n, c, cr, h, w in (CUDA_CASES if device == "cuda" else CASES):
        ref, fused = make_pair(c, cr, dtype, device, backend)
        x = (torch.randn(n, c, h, w, device=device) + 0.3).to(dtype)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        x_ref, x_fused, out_ref, out = forward_backward_pair(ref, fused, x, dtype)
        assert out.dtype == dtype
        if channels_last and h * w > 1:
            assert out.is_contiguous(memory_format=torch.channels_last)
        assert_close(out, out_ref, dtype, "output")
        assert_close(x_fused.grad, x_ref.grad, dtype, "grad input")
        scale = 1.0 if dtype in (torch.float32, torch.float64) else 4.0
        for name in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
            got = fused.get_parameter(name).grad
            assert_close(got, ref.get_parameter(name).grad, dtype, f"grad {name}", scale)


@pytest.mark.parametrize("backend,device", [p for p in backend_params() if p.values[0] in GRADCHECK_BACKENDS])
def test_gradcheck(backend, device):
    torch.manual_seed(1)
    dt = dict(dtype=torch.float64, device=device, requires_grad=True)
    args = (torch.randn(2, 6, 4, 3, **dt), torch.randn(2, 6, 1, 1, **dt), torch.randn(2, **dt),
            torch.randn(6, 2, 1, 1, **dt), torch.randn(6, **dt))
    assert torch.autograd.gradcheck(lambda *a: squeeze_excite(*a, backend)[0], args, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend,device", backend_params())
def test_opcheck(backend, device):
    torch.manual_seed(2)
    dt = dict(device=device, requires_grad=True)
    args = (torch.randn(2, 6, 4, 3, **dt), torch.randn(2, 6, 1, 1, **dt), torch.randn(2, **dt),
            torch.randn(6, 2, 1, 1, **dt), torch.randn(6, **dt), backend)
    torch.library.opcheck(torch.ops.effnet_fast.squeeze_excite.default, args)


@pytest.mark.parametrize("backend,device", backend_params())
def test_kernel_ops_match_reference(backend, device):
    torch.manual_seed(3)
    ref_k, k = kernels("reference"), kernels(backend)
    for n, c, _, h, w in (CUDA_CASES if device == "cuda" else CASES):
        x, g = torch.randn(n, c, h, w, device=device), torch.randn(n, c, h, w, device=device)
        gate, bias = torch.rand(n, c, device=device), torch.randn(n, c, device=device)
        assert_close(k.se_pool(x), ref_k.se_pool(x), torch.float32, "se_pool")
        assert_close(k.se_scale(x, gate, None), ref_k.se_scale(x, gate, None), torch.float32, "se_scale")
        assert_close(k.se_scale(x, gate, bias), ref_k.se_scale(x, gate, bias), torch.float32, "se_scale+bias")
        assert_close(k.se_gate_grad(g, x), ref_k.se_gate_grad(g, x), torch.float32, "se_gate_grad", scale=5)


def test_bad_inputs_raise_clear_errors():
    layer = FusedSqueezeExcitation(8, 2, backend="reference")
    with pytest.raises(ValueError, match="4-D"):
        layer(torch.randn(8, 4, 4))
    with pytest.raises(ValueError, match="fc1 weight"):
        layer(torch.randn(1, 6, 4, 4))


@pytest.mark.parametrize("backend,device,dtype", backend_params(with_dtypes=True))
def test_project_matches_reference(backend, device, dtype):
    """SE followed by the block's 1x1 projection, fused so that x * gate is not stored."""
    torch.manual_seed(4)
    for n, c, cr, h, w in (CUDA_CASES if device == "cuda" else CASES)[:2]:
        ref, fused = make_pair(c, cr, dtype, device, backend)
        conv_ref = torch.nn.Conv2d(c, 12, 1, bias=False).to(device, acc_dtype(dtype))
        conv = torch.nn.Conv2d(c, 12, 1, bias=False).to(device, dtype)
        conv.load_state_dict(conv_ref.state_dict())
        conv_ref.load_state_dict({k: v.to(acc_dtype(dtype)) for k, v in conv.state_dict().items()})
        x = (torch.randn(n, c, h, w, device=device) + 0.3).to(dtype).to(memory_format=torch.channels_last)
        x_ref, x_fused, out_ref, out = forward_backward_pair(lambda t: conv_ref(ref(t)),
                                                             lambda t: fused.forward_project(t, conv), x, dtype)
        assert_close(out, out_ref, dtype, "output")
        assert_close(x_fused.grad, x_ref.grad, dtype, "grad input")
        scale = 1.0 if dtype in (torch.float32, torch.float64) else 4.0
        assert_close(conv.weight.grad, conv_ref.weight.grad, dtype, "grad projection weight", scale)
        for name in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
            assert_close(fused.get_parameter(name).grad, ref.get_parameter(name).grad, dtype, f"grad {name}", scale)


@pytest.mark.parametrize("backend,device", [p for p in backend_params() if p.values[0] in GRADCHECK_BACKENDS])
def test_project_gradcheck_and_opcheck(backend, device):
    torch.manual_seed(5)
    dt = dict(dtype=torch.float64, device=device, requires_grad=True)
    args = (torch.randn(2, 6, 4, 3, **dt), torch.randn(2, 6, 1, 1, **dt), torch.randn(2, **dt),
            torch.randn(6, 2, 1, 1, **dt), torch.randn(6, **dt), torch.randn(5, 6, 1, 1, **dt))
    assert torch.autograd.gradcheck(lambda *a: squeeze_excite_project(*a, backend)[0], args, eps=1e-6, atol=1e-6)
    torch.library.opcheck(torch.ops.effnet_fast.squeeze_excite_project.default, args + (backend,))
