"""Fused depthwise conv + BN + SiLU against the pure-PyTorch layers, every backend."""
import pytest
import torch

from backend_cases import GRADCHECK_BACKENDS, assert_close, backend_params, forward_backward_pair
from effnet_fast.nn import DWConvBNSiLU, FusedDWConvBNSiLU
from effnet_fast.ops import dwconv_bn_silu, dwconv_bn_silu_fn, kernels
from effnet_fast.ops.common import acc_dtype

# (N, C, H, W, kernel, stride): every depthwise class of B0-B7 (k 3/5, stride 1/2),
# odd and tiny planes, batch 1.
CASES = [
    (2, 8, 9, 9, 3, 1),
    (2, 8, 10, 7, 3, 2),
    (2, 8, 9, 11, 5, 1),
    (2, 8, 8, 8, 5, 2),
    (1, 5, 1, 1, 3, 1),
    (1, 3, 2, 3, 5, 2),
    (1, 6, 4, 1, 5, 1),
    (3, 16, 5, 6, 3, 2),
]
# B0's shapes at batch 8 for a CUDA device.
CUDA_CASES = [(8, 32, 112, 112, 3, 1), (8, 96, 112, 112, 3, 2), (8, 144, 56, 56, 5, 2),
              (8, 240, 28, 28, 5, 1), (8, 672, 14, 14, 5, 2), (8, 1152, 7, 7, 3, 1)]


def cases_for(device):
    return CUDA_CASES if device == "cuda" else CASES


def make_pair(c, k, stride, dtype, device, backend, momentum=0.1):
    """A float32/64 reference layer and a fused layer in `dtype` with the same random state."""
    acc = acc_dtype(dtype)
    ref = DWConvBNSiLU(c, k, stride, bn_momentum=momentum).to(device, acc)
    with torch.no_grad():
        ref.conv.weight.copy_(torch.randn_like(ref.conv.weight) * 0.3)
        ref.bn.weight.uniform_(0.5, 1.5)
        ref.bn.bias.uniform_(-0.5, 0.5)
        ref.bn.running_mean.uniform_(-0.5, 0.5)
        ref.bn.running_var.uniform_(0.5, 2.0)
    fused = FusedDWConvBNSiLU(c, k, stride, bn_momentum=momentum, backend=backend).to(device, dtype)
    fused.load_state_dict(ref.state_dict())
    # The reference sees exactly the values the fused layer holds (rounded to dtype).
    ref.load_state_dict({name: t.to(acc) if t.is_floating_point() else t
                         for name, t in fused.state_dict().items()})
    return ref, fused


def random_input(n, c, h, w, dtype, device, channels_last):
    x = (torch.randn(n, c, h, w, device=device) * 2 + 0.5).to(dtype)
    return x.to(memory_format=torch.channels_last) if channels_last else x


def compare_step(ref, fused, x, dtype, train):
    ref.train(train)
    fused.train(train)
    x_ref, x_fused, out_ref, out = forward_backward_pair(ref, fused, x, dtype)
    assert out.dtype == dtype and out.shape == out_ref.shape
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        assert out.is_contiguous(memory_format=torch.channels_last), "output lost channels_last"
    assert_close(out, out_ref, dtype, "output")
    # Gradients sum over many pixels: scale the tolerance with the reduction size.
    assert_close(x_fused.grad, x_ref.grad, dtype, "grad input")
    reduce_scale = 1.0 if dtype in (torch.float32, torch.float64) else 4.0
    assert_close(fused.conv.weight.grad, ref.conv.weight.grad, dtype, "grad conv weight", reduce_scale)
    assert_close(fused.bn.weight.grad, ref.bn.weight.grad, dtype, "grad bn weight", reduce_scale)
    assert_close(fused.bn.bias.grad, ref.bn.bias.grad, dtype, "grad bn bias", reduce_scale)


@pytest.mark.parametrize("backend,device,dtype", backend_params(with_dtypes=True))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_matches_reference(backend, device, dtype, channels_last, train):
    torch.manual_seed(0)
    for n, c, h, w, k, stride in cases_for(device):
        if train and n * h * w == 1:
            continue  # BatchNorm cannot train on one value per channel
        ref, fused = make_pair(c, k, stride, dtype, device, backend)
        for _ in range(2 if train else 1):
            ref.zero_grad(), fused.zero_grad()
            compare_step(ref, fused, random_input(n, c, h, w, dtype, device, channels_last), dtype, train)
        # The fused layer keeps its running statistics in `dtype`: compare at that precision.
        stats_dtype = dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            assert_close(getattr(fused.bn, name), getattr(ref.bn, name), stats_dtype, name)


@pytest.mark.parametrize("backend,device", backend_params())
def test_running_stats_cumulative_momentum(backend, device):
    """momentum=None means a cumulative moving average, as in nn.BatchNorm2d."""
    torch.manual_seed(1)
    ref, fused = make_pair(8, 3, 1, torch.float32, device, backend, momentum=None)
    for _ in range(3):
        x = random_input(2, 8, 6, 6, torch.float32, device, False)
        ref.train()(x), fused.train()(x)
    assert_close(fused.bn.running_mean, ref.bn.running_mean, torch.float32, "running_mean")
    assert_close(fused.bn.running_var, ref.bn.running_var, torch.float32, "running_var")


@pytest.mark.parametrize("backend,device", [p for p in backend_params() if p.values[0] in GRADCHECK_BACKENDS])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("k,stride", [(3, 1), (5, 2)])
def test_gradcheck(backend, device, train, k, stride):
    torch.manual_seed(2)
    dt = dict(dtype=torch.float64, device=device)
    x = torch.randn(2, 3, 5, 6, **dt, requires_grad=True)
    w = torch.randn(3, 1, k, k, **dt, requires_grad=True)
    g = torch.rand(3, **dt).add(0.5).requires_grad_()
    b = torch.randn(3, **dt, requires_grad=True)
    rm, rv = torch.randn(3, **dt), torch.rand(3, **dt) + 0.5

    def fn(x, w, g, b):
        return dwconv_bn_silu(x, w, g, b, rm, rv, train, 1e-5, stride, backend)[0]

    assert torch.autograd.gradcheck(fn, (x, w, g, b), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend,device", backend_params())
def test_opcheck(backend, device):
    torch.manual_seed(3)
    x = torch.randn(2, 4, 6, 5, device=device, requires_grad=True)
    w = torch.randn(4, 1, 3, 3, device=device, requires_grad=True)
    g, b = torch.rand(4, device=device, requires_grad=True), torch.randn(4, device=device, requires_grad=True)
    rm, rv = torch.zeros(4, device=device), torch.ones(4, device=device)
    for train in (True, False):
        torch.library.opcheck(torch.ops.effnet_fast.dwconv_bn_silu.default,
                              (x, w, g, b, rm, rv, train, 1e-5, 2, backend))


@pytest.mark.parametrize("backend,device", backend_params())
def test_kernel_ops_match_reference(backend, device):
    """The kernel-level ops one by one, so a failure points at one kernel."""
    torch.manual_seed(4)
    ref_k, k = kernels("reference"), kernels(backend)
    for n, c, h, w, ks, stride in cases_for(device)[:4]:
        x = torch.randn(n, c, h, w, device=device)
        wt = torch.randn(c, 1, ks, ks, device=device)
        scale, shift, mean = (torch.randn(c, device=device) for _ in range(3))
        ca, cb, cc = (torch.randn(c, device=device) for _ in range(3))
        out_ref = ref_k.dwconv_bn_silu_forward(x, wt, scale, shift, stride)
        g = torch.randn_like(out_ref)
        checks = {
            "stats": (k.dwconv_bn_silu_stats(x, wt, stride), ref_k.dwconv_bn_silu_stats(x, wt, stride)),
            "forward": (k.dwconv_bn_silu_forward(x, wt, scale, shift, stride), out_ref),
            "backward_reduce": (k.dwconv_bn_silu_backward_reduce(g, x, wt, scale, shift, mean, stride),
                                ref_k.dwconv_bn_silu_backward_reduce(g, x, wt, scale, shift, mean, stride)),
            "backward": (k.dwconv_bn_silu_backward(g, x, wt, scale, shift, ca, cb, cc, stride),
                         ref_k.dwconv_bn_silu_backward(g, x, wt, scale, shift, ca, cb, cc, stride)),
        }
        for name, (got, want) in checks.items():
            got = got if isinstance(got, (tuple, list)) else (got,)
            want = want if isinstance(want, (tuple, list)) else (want,)
            for i, (a, e) in enumerate(zip(got, want)):
                assert_close(a, e, torch.float32, f"{name}[{i}] at {(n, c, h, w, ks, stride)}", scale=5)


@pytest.mark.parametrize("backend,device", backend_params())
def test_kernel_ops_many_blocks(backend, device):
    """Planes large enough that every reduction spans several tiles and pixel groups per
    channel, on data whose mean is far larger than its spread (no cancellation allowed)."""
    torch.manual_seed(5)
    ref_k, k = kernels("reference"), kernels(backend)
    n, c, h, w = (8, 32, 64, 64) if device == "cuda" else (2, 4, 24, 24)
    for ks, stride in ((3, 1), (5, 2)):
        x = torch.randn(n, c, h, w, device=device) * 0.1 + 50
        wt = torch.randn(c, 1, ks, ks, device=device) * 0.01
        wt[:, :, ks // 2, ks // 2] += 1
        mean, var = k.dwconv_bn_silu_stats(x, wt, stride)
        mean64, var64 = ref_k.dwconv_bn_silu_stats(x.double(), wt.double(), stride)
        assert_close(mean, mean64, torch.float32, f"mean k={ks}")
        assert_close(var, var64, torch.float32, f"var k={ks}")
        scale, shift = torch.rsqrt(var + 1e-5), -mean * torch.rsqrt(var + 1e-5)
        ca, cb, cc = (torch.randn(c, device=device) for _ in range(3))
        g = torch.randn_like(ref_k.dwconv_bn_silu_forward(x, wt, scale, shift, stride))
        for name, got, want in (
                ("backward_reduce", k.dwconv_bn_silu_backward_reduce(g, x, wt, scale, shift, mean, stride),
                 ref_k.dwconv_bn_silu_backward_reduce(g, x, wt, scale, shift, mean, stride)),
                ("backward", k.dwconv_bn_silu_backward(g, x, wt, scale, shift, ca, cb, cc, stride),
                 ref_k.dwconv_bn_silu_backward(g, x, wt, scale, shift, ca, cb, cc, stride))):
            for i, (a, e) in enumerate(zip(got, want)):
                assert_close(a, e, torch.float32, f"{name}[{i}] k={ks}", scale=5)


@pytest.mark.parametrize("backend,device", backend_params())
def test_constant_planes(backend, device):
    """Edge case: a constant input gives zero batch variance; outputs stay finite."""
    ref, fused = make_pair(4, 3, 1, torch.float32, device, backend)
    x = torch.full((2, 4, 5, 5), 0.7, device=device)
    compare_step(ref, fused, x, torch.float32, train=True)


def test_bad_inputs_raise_clear_errors():
    layer = FusedDWConvBNSiLU(4, 3, 1, backend="reference")
    with pytest.raises(ValueError, match="4-D"):
        layer(torch.randn(4, 5, 5))
    with pytest.raises(ValueError, match="input has 3 channels"):
        layer(torch.randn(1, 3, 5, 5))
    with pytest.raises(TypeError, match="dtype"):
        layer(torch.randn(1, 4, 5, 5, dtype=torch.float64))
    with pytest.raises(TypeError, match="unsupported dtype"):
        dwconv_bn_silu_fn(torch.ones(1, 4, 5, 5, dtype=torch.int32), torch.ones(4, 1, 3, 3, dtype=torch.int32),
                          layer.bn.weight, layer.bn.bias, layer.bn.running_mean, layer.bn.running_var,
                          False, 1e-5, 1, "reference")
    bad_k = FusedDWConvBNSiLU(4, 7, 1, backend="reference")
    with pytest.raises(ValueError, match="kernel size 7"):
        bad_k(torch.randn(1, 4, 9, 9))
    with pytest.raises(ValueError, match="fused must be"):
        FusedDWConvBNSiLU(4, 3, 1, backend="nope")(torch.randn(1, 4, 5, 5))


@pytest.mark.parametrize("backend,device", backend_params())
def test_saturated_silu_stays_finite(backend, device):
    """Edge case: |z| far beyond exp's float range (sigmoid saturates to 0 or 1)."""
    ref_k, k = kernels("reference"), kernels(backend)
    x = torch.linspace(-300, 300, 2 * 3 * 5 * 5, device=device).view(2, 3, 5, 5)
    wt = torch.zeros(3, 1, 3, 3, device=device)
    wt[:, :, 1, 1] = 1
    one, zero = torch.ones(3, device=device), torch.zeros(3, device=device)
    g = torch.randn(2, 3, 5, 5, device=device)
    assert_close(k.dwconv_bn_silu_forward(x, wt, one, zero, 1), ref_k.dwconv_bn_silu_forward(x, wt, one, zero, 1),
                 torch.float32, "forward")
    got = k.dwconv_bn_silu_backward(g, x, wt, one, zero, one, zero, zero, 1)
    want = ref_k.dwconv_bn_silu_backward(g, x, wt, one, zero, one, zero, zero, 1)
    assert_close(got[0], want[0], torch.float32, "grad input")
    assert_close(got[1], want[1], torch.float32, "grad weight", scale=5)
