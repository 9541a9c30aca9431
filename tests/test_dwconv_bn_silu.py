"""Fused depthwise conv + BN + SiLU against the pure-PyTorch layers, every backend."""
import pytest
import torch

from backend_cases import GRADCHECK_BACKENDS, assert_close, backend_params, forward_backward_pair
from effnet_fast.nn import DWConvBNSiLU, FusedDWConvBNSiLU
from effnet_fast.ops import dwconv_bn_silu, dwconv_bn_silu_fn, kernels
from effnet_fast.ops.backends import cpu_built
from effnet_fast.ops.common import acc_dtype, tf_same_padding_2d

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


def make_pair(c, k, stride, dtype, device, backend, momentum=0.1, padding="symmetric"):
    """A float32/64 reference layer and a fused layer in `dtype` with the same random state."""
    acc = acc_dtype(dtype)
    ref = DWConvBNSiLU(c, k, stride, bn_momentum=momentum, padding=padding).to(device, acc)
    with torch.no_grad():
        ref.conv.weight.copy_(torch.randn_like(ref.conv.weight) * 0.3)
        ref.bn.weight.uniform_(0.5, 1.5)
        ref.bn.bias.uniform_(-0.5, 0.5)
        ref.bn.running_mean.uniform_(-0.5, 0.5)
        ref.bn.running_var.uniform_(0.5, 2.0)
    fused = FusedDWConvBNSiLU(c, k, stride, bn_momentum=momentum, backend=backend, padding=padding).to(device, dtype)
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


@pytest.mark.parametrize("padding", [None, [0, 1, 1, 1]], ids=["symmetric", "asymmetric"])
@pytest.mark.parametrize("backend,device", backend_params())
def test_opcheck(backend, device, padding):
    torch.manual_seed(3 if padding is None else 10)
    x = torch.randn(2, 4, 6, 5, device=device, requires_grad=True)
    w = torch.randn(4, 1, 3, 3, device=device, requires_grad=True)
    g, b = torch.rand(4, device=device, requires_grad=True), torch.randn(4, device=device, requires_grad=True)
    rm, rv = torch.zeros(4, device=device), torch.ones(4, device=device)
    extra = () if padding is None else ("", padding)  # group, then (top, bottom, left, right)
    for train in (True, False):
        torch.library.opcheck(torch.ops.effnet_fast.dwconv_bn_silu.default,
                              (x, w, g, b, rm, rv, train, 1e-5, 2, backend, *extra))


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


@pytest.mark.skipif(not cpu_built(), reason="the C++ CPU kernels are not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_cpu_channels_last_wide_rows(dtype):
    """The CPU kernels' channels_last rows compute their interior pixels several at a
    time when the channels fill whole vectors: C of 2 whole vectors and of 2 and a
    part, rows wide enough for several blocks, every kernel / stride and asymmetric
    padding, all four kernels against the reference kernels (in float64)."""
    torch.manual_seed(7)
    ref_k, k = kernels("reference"), kernels("cpu")
    lanes = 64 // acc_dtype(dtype).itemsize  # floats (or doubles) per AVX-512 vector
    for c in (2 * lanes, 2 * lanes + 3):
        for (h, w), ks, stride, padding in (((9, 23), 3, 1, None), ((10, 22), 3, 2, None), ((11, 26), 5, 1, None),
                                            ((12, 25), 5, 2, None), ((8, 21), 3, 2, (0, 1, 0, 1)),
                                            ((9, 24), 5, 2, (1, 2, 1, 2)), ((7, 19), 5, 1, (2, 1, 0, 2))):
            x = random_input(2, c, h, w, dtype, "cpu", True)
            wt = (torch.randn(c, 1, ks, ks) * 0.3).to(dtype)
            x64, w64 = x.double(), wt.double()
            what = f"C={c} {h}x{w} k{ks} s{stride} padding={padding}"
            mean, var = k.dwconv_bn_silu_stats(x, wt, stride, padding)
            mean64, var64 = ref_k.dwconv_bn_silu_stats(x64, w64, stride, padding)
            assert_close(mean, mean64, dtype, f"mean {what}")
            assert_close(var, var64, dtype, f"var {what}")
            scale, shift = torch.rand(c, dtype=mean.dtype) + 0.5, torch.randn(c, dtype=mean.dtype) * 0.2
            out = k.dwconv_bn_silu_forward(x, wt, scale, shift, stride, padding)
            out64 = ref_k.dwconv_bn_silu_forward(x64, w64, scale.double(), shift.double(), stride, padding)
            assert_close(out, out64, dtype, f"forward {what}")
            g = torch.randn(out.shape, dtype=torch.float64).to(dtype).contiguous(memory_format=torch.channels_last)
            ca, cb, cc = (torch.randn(c, dtype=mean.dtype) for _ in range(3))
            args = (scale, shift, ca, cb, cc)
            for name, got, want in (
                    ("backward_reduce", k.dwconv_bn_silu_backward_reduce(g, x, wt, scale, shift, mean, stride, padding),
                     ref_k.dwconv_bn_silu_backward_reduce(g.double(), x64, w64, scale.double(), shift.double(),
                                                          mean.double(), stride, padding)),
                    ("backward", k.dwconv_bn_silu_backward(g, x, wt, *args, stride, padding),
                     ref_k.dwconv_bn_silu_backward(g.double(), x64, w64, *(a.double() for a in args), stride,
                                                   padding))):
                for i, (a, e) in enumerate(zip(got, want)):
                    assert_close(a, e, dtype, f"{name}[{i}] {what}", scale=4)


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


# TF 'same' padding: (N, C, H, W, kernel, stride) with odd and even sizes, so that the
# padding is symmetric (odd) or one less at the top / left (even) along each dim.
SAME_CASES = [
    (2, 4, 8, 8, 3, 2),
    (2, 4, 7, 6, 3, 2),
    (2, 4, 6, 9, 5, 2),
    (1, 3, 9, 7, 5, 2),
    (2, 4, 2, 3, 5, 2),
    (2, 4, 6, 5, 5, 1),
]
# Every (top, bottom, left, right) the kernel ops accept for k = 3, and some for k = 5.
PADDINGS = {3: [(0, 1, 0, 1), (1, 0, 0, 0), (0, 0, 1, 1), (1, 1, 0, 1)],
            5: [(1, 2, 1, 2), (2, 1, 0, 2), (0, 0, 2, 1), (2, 2, 2, 2)]}


@pytest.mark.parametrize("backend,device,dtype", backend_params(with_dtypes=True))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_same_padding_matches_reference(backend, device, dtype, channels_last, train):
    """The fused layer with TF 'same' padding (a Conv2dSame) against the reference layer."""
    torch.manual_seed(6)
    cases = [(8, 32, 56, 56, 5, 2), (8, 16, 57, 58, 3, 2)] if device == "cuda" else SAME_CASES
    for n, c, h, w, k, stride in cases:
        ref, fused = make_pair(c, k, stride, dtype, device, backend, padding="same")
        assert type(fused.conv).__name__ == ("Conv2dSame" if stride == 2 else "Conv2d")
        compare_step(ref, fused, random_input(n, c, h, w, dtype, device, channels_last), dtype, train)
        assert_close(fused.bn.running_mean, ref.bn.running_mean,
                     dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32, "running_mean")


def test_same_padding_reference_layer_is_tensorflows():
    """The reference layer pads as TensorFlow: for stride 2 an even size gets one zero less
    at the top / left than at the bottom / right, an odd size k // 2 on both sides."""
    ref = DWConvBNSiLU(2, 3, 2, padding="same").eval()
    x = torch.randn(1, 2, 6, 7)
    padded = torch.nn.functional.pad(x, (1, 1, 0, 1))  # W = 7: 1 and 1; H = 6: 0 and 1
    expected = torch.nn.functional.silu(ref.bn(torch.nn.functional.conv2d(padded, ref.conv.weight, stride=2,
                                                                          groups=2)))
    torch.testing.assert_close(ref(x), expected)
    assert tf_same_padding_2d(6, 7, 3, 2) == (0, 1, 1, 1) and tf_same_padding_2d(8, 8, 5, 2) == (1, 2, 1, 2)
    assert tf_same_padding_2d(9, 9, 5, 1) == (2, 2, 2, 2) and tf_same_padding_2d(1, 1, 5, 2) == (2, 2, 2, 2)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_kernel_ops_asymmetric_padding(backend, device, channels_last):
    """Each kernel op with explicit asymmetric padding against the reference kernels, and the
    reference kernels against F.pad + conv2d, on odd and even sizes."""
    torch.manual_seed(7)
    ref_k, k = kernels("reference"), kernels(backend)
    for ks, pads in PADDINGS.items():
        for stride, (h, w) in ((2, (7, 8)), (1, (6, 5)), (2, (9, 10))):
            for padding in pads:
                n, c = 2, 3
                x = torch.randn(n, c, h, w, device=device)
                if channels_last:
                    x = x.to(memory_format=torch.channels_last)
                wt = torch.randn(c, 1, ks, ks, device=device)
                scale, shift, mean, ca, cb, cc = (torch.randn(c, device=device) for _ in range(6))
                top, bottom, left, right = padding
                y = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (left, right, top, bottom)), wt,
                                               stride=stride, groups=c)
                where = f"k={ks} stride={stride} {h}x{w} padding={padding}"
                out_ref = ref_k.dwconv_bn_silu_forward(x, wt, scale, shift, stride, list(padding))
                assert_close(out_ref, torch.nn.functional.silu(y * scale[:, None, None] + shift[:, None, None]),
                             torch.float32, f"reference forward {where}")
                g = torch.randn_like(out_ref)
                args = (stride, list(padding))
                checks = {
                    "stats": (k.dwconv_bn_silu_stats(x, wt, *args), ref_k.dwconv_bn_silu_stats(x, wt, *args)),
                    "forward": ((k.dwconv_bn_silu_forward(x, wt, scale, shift, *args),), (out_ref,)),
                    "backward_reduce": (k.dwconv_bn_silu_backward_reduce(g, x, wt, scale, shift, mean, *args),
                                        ref_k.dwconv_bn_silu_backward_reduce(g, x, wt, scale, shift, mean, *args)),
                    "backward": (k.dwconv_bn_silu_backward(g, x, wt, scale, shift, ca, cb, cc, *args),
                                 ref_k.dwconv_bn_silu_backward(g, x, wt, scale, shift, ca, cb, cc, *args)),
                }
                for name, (got, want) in checks.items():
                    for i, (a, e) in enumerate(zip(got, want)):
                        assert a.shape == e.shape, f"{name}[{i}] {where}"
                        assert_close(a, e, torch.float32, f"{name}[{i}] {where}", scale=5)


def test_reference_backward_matches_autograd_with_padding():
    """The reference kernels' grad_x and grad_weight for asymmetric padding are autograd's."""
    torch.manual_seed(8)
    ref_k = kernels("reference")
    x = torch.randn(2, 3, 8, 7, dtype=torch.float64, requires_grad=True)
    wt = torch.randn(3, 1, 5, 5, dtype=torch.float64, requires_grad=True)
    scale, shift, ca, cb, cc = (torch.randn(3, dtype=torch.float64) for _ in range(5))
    padding = [1, 2, 2, 1]
    y = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (2, 1, 1, 2)), wt, stride=2, groups=3)
    z = y * scale[:, None, None] + shift[:, None, None]
    g = torch.randn_like(y)
    dz = g * torch.autograd.grad(torch.nn.functional.silu(z), z, torch.ones_like(z), retain_graph=True)[0]
    dy = ca[:, None, None] * dz + cb[:, None, None] * y + cc[:, None, None]
    want = torch.autograd.grad(y, (x, wt), dy.detach())
    got = ref_k.dwconv_bn_silu_backward(g, x.detach(), wt.detach(), scale, shift, ca, cb, cc, 2, padding)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


@pytest.mark.parametrize("backend,device", [p for p in backend_params() if p.values[0] in GRADCHECK_BACKENDS])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("k,padding", [(3, (0, 1, 0, 1)), (5, (1, 2, 2, 1))])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_gradcheck_asymmetric_padding(backend, device, train, k, padding, channels_last):
    torch.manual_seed(9)
    dt = dict(dtype=torch.float64, device=device)
    x = torch.randn(1, 2, 5, 4, **dt)  # small: gradcheck runs the op twice per input element
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.randn(2, 1, k, k, **dt, requires_grad=True)
    g = torch.rand(2, **dt).add(0.5).requires_grad_()
    b = torch.randn(2, **dt, requires_grad=True)
    rm, rv = torch.randn(2, **dt), torch.rand(2, **dt) + 0.5

    def fn(x, w, g, b):
        return dwconv_bn_silu_fn(x, w, g, b, rm, rv, train, 1e-5, 2, backend, padding=padding)[0]

    assert torch.autograd.gradcheck(fn, (x, w, g, b), eps=1e-6, atol=1e-6)


def test_bad_padding_raises_clear_errors():
    layer = FusedDWConvBNSiLU(4, 3, 2, backend="reference")
    args = (layer.conv.weight, layer.bn.weight, layer.bn.bias, layer.bn.running_mean, layer.bn.running_var,
            False, 1e-5, 2, "reference")
    x = torch.randn(1, 4, 6, 6)
    with pytest.raises(ValueError, match=r"padding must be \(top, bottom, left, right\)"):
        dwconv_bn_silu_fn(x, *args, padding=(0, 1))
    with pytest.raises(ValueError, match=r"\[0, k // 2 = 1\]"):
        dwconv_bn_silu_fn(x, *args, padding=(0, 2, 0, 1))
    with pytest.raises(ValueError, match="smaller than the 3x3 kernel"):
        dwconv_bn_silu_fn(torch.randn(1, 4, 1, 6), *args, padding=(0, 0, 1, 1))
    with pytest.raises(ValueError, match="padding must be one of"):
        FusedDWConvBNSiLU(4, 3, 2, padding="valid")


@pytest.mark.parametrize("backend,device", [p for p in backend_params() if p.values[0] != "reference"])
def test_kernel_ops_refuse_bad_padding(backend, device):
    k = kernels(backend)
    x, w = torch.randn(1, 4, 5, 5, device=device), torch.randn(4, 1, 3, 3, device=device)
    for x_in, padding, message in ((x, [0, 2, 0, 0], r"k // 2 = 1\]"), (x, [0, 1], r"\(top, bottom, left, right\)"),
                                   (x[:, :, :1], [0, 0, 1, 1], "smaller than the 3x3 kernel")):
        with pytest.raises((RuntimeError, ValueError), match=message):
            k.dwconv_bn_silu_stats(x_in, w, 1, padding)
