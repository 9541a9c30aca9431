"""Fused BatchNorm + SiLU (the stem, expand and head convs' BN + SiLU) against
F.silu(nn.BatchNorm2d(y)), every backend."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from backend_cases import GRADCHECK_BACKENDS, assert_close, backend_params, forward_backward_pair
from effnet_fast.nn import ConvBNAct, FusedConvBNAct
from effnet_fast import set_fused
from effnet_fast.ops import kernels
from effnet_fast.ops.backends import cpu_built, cuda_emu_built
from effnet_fast.nn import bn_silu
from effnet_fast.ops.bn_silu import bn_silu_op
from effnet_fast.ops.common import acc_dtype

# (N, C, H, W): odd planes, one pixel, channel counts past a vector and a channel
# block (a tail in channels_last), batch 1.
CASES = [(2, 8, 9, 9), (2, 8, 10, 7), (1, 5, 1, 1), (1, 3, 2, 3), (3, 16, 5, 6), (2, 40, 4, 4), (2, 70, 3, 5)]
# B0's expand / head shapes at batch 8 for a CUDA device.
CUDA_CASES = [(8, 32, 112, 112), (8, 96, 112, 112), (8, 144, 56, 56), (8, 240, 28, 28), (8, 672, 14, 14),
              (8, 1280, 7, 7)]
KERNEL_OPS = ("bn_silu_stats", "bn_silu_forward", "bn_silu_backward_reduce", "bn_silu_backward")


def cases_for(device):
    return CUDA_CASES if device == "cuda" else CASES


def make_pair(c, dtype, device, momentum=0.1, track_running_stats=True):
    """A float32/64 reference BatchNorm and one in `dtype` for the fused op, same random state."""
    acc = acc_dtype(dtype)
    ref = nn.BatchNorm2d(c, momentum=momentum, track_running_stats=track_running_stats).to(device, acc)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
        if track_running_stats:
            ref.running_mean.uniform_(-0.5, 0.5)
            ref.running_var.uniform_(0.5, 2.0)
    fused = nn.BatchNorm2d(c, momentum=momentum, track_running_stats=track_running_stats).to(device, dtype)
    fused.load_state_dict(ref.state_dict())
    # The reference sees exactly the values the fused op holds (rounded to dtype).
    ref.load_state_dict({name: t.to(acc) if t.is_floating_point() else t for name, t in fused.state_dict().items()})
    return ref, fused


def random_input(n, c, h, w, dtype, device, channels_last):
    y = (torch.randn(n, c, h, w, device=device) * 2 + 0.5).to(dtype)
    return y.to(memory_format=torch.channels_last) if channels_last else y


def compare_step(ref, fused, y, dtype, train, backend):
    ref.train(train)
    fused.train(train)
    y_ref, y_fused, out_ref, out = forward_backward_pair(lambda t: F.silu(ref(t)),
                                                         lambda t: bn_silu(t, fused, backend), y, dtype)
    assert out.dtype == dtype and out.shape == out_ref.shape
    if y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous():
        assert out.is_contiguous(memory_format=torch.channels_last), "output lost channels_last"
    assert_close(out, out_ref, dtype, "output")
    assert_close(y_fused.grad, y_ref.grad, dtype, "grad input")
    reduce_scale = 1.0 if dtype in (torch.float32, torch.float64) else 4.0
    assert_close(fused.weight.grad, ref.weight.grad, dtype, "grad bn weight", reduce_scale)
    assert_close(fused.bias.grad, ref.bias.grad, dtype, "grad bn bias", reduce_scale)


def assert_same_running_stats(fused, ref, dtype):
    # The fused BatchNorm keeps its running statistics in `dtype`: compare at that precision.
    stats_dtype = dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert_close(getattr(fused, name), getattr(ref, name), stats_dtype, name)


@pytest.mark.parametrize("backend,device,dtype", backend_params(with_dtypes=True))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_matches_reference(backend, device, dtype, channels_last, train):
    torch.manual_seed(0)
    for n, c, h, w in cases_for(device):
        if train and n * h * w == 1:
            continue  # BatchNorm cannot train on one value per channel
        ref, fused = make_pair(c, dtype, device)
        for _ in range(2 if train else 1):
            ref.zero_grad(), fused.zero_grad()
            compare_step(ref, fused, random_input(n, c, h, w, dtype, device, channels_last), dtype, train, backend)
        assert_same_running_stats(fused, ref, dtype)


@pytest.mark.parametrize("backend,device", backend_params())
def test_running_stats_cumulative_momentum(backend, device):
    """momentum=None means a cumulative moving average, as in nn.BatchNorm2d."""
    torch.manual_seed(1)
    ref, fused = make_pair(8, torch.float32, device, momentum=None)
    for _ in range(3):
        y = random_input(2, 8, 6, 6, torch.float32, device, False)
        ref.train()(y), bn_silu(y, fused.train(), backend)
    assert_same_running_stats(fused, ref, torch.float32)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_without_running_stats(backend, device, train):
    """track_running_stats=False: batch statistics in eval mode too, nothing to update."""
    torch.manual_seed(2)
    ref, fused = make_pair(8, torch.float32, device, track_running_stats=False)
    compare_step(ref, fused, random_input(2, 8, 5, 5, torch.float32, device, True), torch.float32, train, backend)
    assert fused.running_mean is None and fused.num_batches_tracked is None


@pytest.mark.parametrize("backend,device", [p for p in backend_params() if p.values[0] in GRADCHECK_BACKENDS])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_gradcheck(backend, device, train, channels_last):
    torch.manual_seed(3)
    dt = dict(dtype=torch.float64, device=device)
    y = torch.randn(2, 3, 4, 5, **dt)
    y = y.to(memory_format=torch.channels_last) if channels_last else y
    y.requires_grad_()
    g = torch.rand(3, **dt).add(0.5).requires_grad_()
    b = torch.randn(3, **dt, requires_grad=True)
    rm, rv = torch.randn(3, **dt), torch.rand(3, **dt) + 0.5

    def fn(y, g, b):
        return bn_silu_op(y, g, b, rm, rv, train, 1e-5, backend)[0]

    assert torch.autograd.gradcheck(fn, (y, g, b), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_opcheck(backend, device, channels_last):
    torch.manual_seed(4)
    y = torch.randn(2, 4, 6, 5, device=device)
    y = (y.to(memory_format=torch.channels_last) if channels_last else y).requires_grad_()
    g, b = torch.rand(4, device=device, requires_grad=True), torch.randn(4, device=device, requires_grad=True)
    rm, rv = torch.zeros(4, device=device), torch.ones(4, device=device)
    for train in (True, False):
        torch.library.opcheck(torch.ops.effnet_fast.bn_silu.default, (y, g, b, rm, rv, train, 1e-5, backend))


def kernel_op(backend, name):
    """The registered kernel op of `backend` (the reference kernels are plain functions)."""
    if backend == "cuda_emu":
        cuda_emu_built()  # loads the namespace
    namespace = {"cpu": "effnet_fast", "cuda": "effnet_fast", "cuda_emu": "effnet_fast_emu",
                 "triton": "effnet_fast_triton"}[backend]
    kernels(backend)  # imports the Triton ops
    return getattr(getattr(torch.ops, namespace), name).default


def kernel_args(n, c, h, w, device, channels_last, seed=0):
    """Arguments of each kernel op on random inputs."""
    gen = torch.Generator(device=device).manual_seed(seed)
    y = torch.randn(n, c, h, w, device=device, generator=gen)
    g = torch.randn(n, c, h, w, device=device, generator=gen)
    if channels_last:
        y, g = y.to(memory_format=torch.channels_last), g.to(memory_format=torch.channels_last)
    scale, shift, mean, ca, cb, cc = (torch.randn(c, device=device, generator=gen) for _ in range(6))
    return {"bn_silu_stats": (y,), "bn_silu_forward": (y, scale, shift),
            "bn_silu_backward_reduce": (g, y, scale, shift, mean),
            "bn_silu_backward": (g, y, scale, shift, ca, cb, cc)}


@pytest.mark.parametrize("backend,device", [p for p in backend_params() if p.values[0] != "reference"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_kernel_opcheck(backend, device, channels_last):
    for name, args in kernel_args(2, 5, 4, 3, device, channels_last).items():
        torch.library.opcheck(kernel_op(backend, name), args)


def as_tuple(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_kernel_ops_match_reference(backend, device, channels_last):
    """The kernel-level ops one by one, so a failure points at one kernel."""
    ref_k, k = kernels("reference"), kernels(backend)
    for seed, shape in enumerate(cases_for(device)):
        for name, args in kernel_args(*shape, device, channels_last, seed).items():
            got, want = as_tuple(getattr(k, name)(*args)), as_tuple(getattr(ref_k, name)(*args))
            for i, (a, e) in enumerate(zip(got, want)):
                assert a.dtype == e.dtype and a.shape == e.shape, f"{name}[{i}] at {shape}"
                if a.dim() == 4:
                    assert a.stride() == e.stride(), f"{name}[{i}] at {shape}: layout {a.stride()}, want {e.stride()}"
                assert_close(a, e, torch.float32, f"{name}[{i}] at {shape}", scale=5)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_kernel_ops_many_blocks(backend, device, channels_last):
    """Tensors large enough that every reduction spans several tiles, chunks and pixel
    groups per channel, on data whose mean is far larger than its spread (no
    cancellation allowed)."""
    torch.manual_seed(5)
    ref_k, k = kernels("reference"), kernels(backend)
    n, c, h, w = (8, 96, 64, 64) if device == "cuda" else (2, 36, 24, 26)
    if backend in ("triton", "cuda_emu") and device == "cpu":
        n, c = 2, 6  # the interpreter and the emulation run every program in Python / fibers
    y = torch.randn(n, c, h, w, device=device) * 0.1 + 50
    y = y.to(memory_format=torch.channels_last) if channels_last else y
    mean, var = k.bn_silu_stats(y)
    mean64, var64 = ref_k.bn_silu_stats(y.double())
    assert_close(mean, mean64, torch.float32, "mean")
    assert_close(var, var64, torch.float32, "var")
    scale, shift = torch.rsqrt(var + 1e-5), -mean * torch.rsqrt(var + 1e-5)
    ca, cb, cc = (torch.randn(c, device=device) for _ in range(3))
    g = torch.randn_like(y)
    for name, args in (("bn_silu_backward_reduce", (g, y, scale, shift, mean)),
                       ("bn_silu_backward", (g, y, scale, shift, ca, cb, cc))):
        for i, (a, e) in enumerate(zip(as_tuple(getattr(k, name)(*args)), as_tuple(getattr(ref_k, name)(*args)))):
            assert_close(a, e, torch.float32, f"{name}[{i}]", scale=5)


@pytest.mark.parametrize("backend,device", backend_params())
def test_constant_input(backend, device):
    """Edge case: a constant input gives zero batch variance; outputs stay finite."""
    ref, fused = make_pair(4, torch.float32, device)
    y = torch.full((2, 4, 5, 5), 0.7, device=device)
    compare_step(ref, fused, y, torch.float32, True, backend)


@pytest.mark.parametrize("backend,device", backend_params())
def test_saturated_silu_stays_finite(backend, device):
    """Edge case: |z| far beyond exp's float range (sigmoid saturates to 0 or 1)."""
    ref_k, k = kernels("reference"), kernels(backend)
    y = torch.linspace(-300, 300, 2 * 3 * 5 * 5, device=device).view(2, 3, 5, 5)
    one, zero = torch.ones(3, device=device), torch.zeros(3, device=device)
    g = torch.randn_like(y)
    assert_close(k.bn_silu_forward(y, one, zero), ref_k.bn_silu_forward(y, one, zero), torch.float32, "forward")
    assert_close(k.bn_silu_backward(g, y, one, zero, one, zero, zero),
                 ref_k.bn_silu_backward(g, y, one, zero, one, zero, zero), torch.float32, "grad input")
    for a, e in zip(k.bn_silu_backward_reduce(g, y, one, zero, zero),
                    ref_k.bn_silu_backward_reduce(g, y, one, zero, zero)):
        assert_close(a, e, torch.float32, "backward_reduce", scale=5)


def test_backward_saves_only_the_input_and_channel_vectors():
    """Recompute instead of store: y and (C,) vectors are all that backward keeps."""
    bn = nn.BatchNorm2d(8)
    y = torch.randn(2, 8, 6, 6, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        bn_silu(y, bn, "reference")
    big = [tuple(t.shape) for t in saved if t.numel() > 8]
    assert big == [tuple(y.shape)], big


@pytest.mark.parametrize("backend,device", [p for p in backend_params() if p.values[0] in ("reference", "cpu")])
def test_fused_conv_bn_act_matches_reference(backend, device):
    """The stem / expand / head layer: conv + fused BN + SiLU on the layer's backend."""
    torch.manual_seed(6)
    ref = ConvBNAct(3, 8, 3, stride=2).to(device)
    fused = FusedConvBNAct(3, 8, 3, stride=2, backend=backend).to(device)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 9, 9, device=device)
    for train in (True, False):
        ref.train(train), fused.train(train)
        x_ref, x_fused, out_ref, out = forward_backward_pair(ref, fused, x, torch.float32)
        assert_close(out, out_ref, torch.float32, "output")
        assert_close(x_fused.grad, x_ref.grad, torch.float32, "grad input")
    for (name, p_ref), p in zip(ref.named_parameters(), fused.parameters()):
        assert_close(p.grad, p_ref.grad, torch.float32, f"grad {name}")
    assert_close(fused.bn.running_var, ref.bn.running_var, torch.float32, "running_var")


def test_set_fused_gives_conv_bn_act_its_backend():
    block = set_fused(nn.Sequential(ConvBNAct(4, 8, 1), ConvBNAct(8, 4, 1, act=False)), "reference")
    assert all(isinstance(m, FusedConvBNAct) and m.backend == "reference" for m in block)
    assert "backend='reference'" in repr(block[0])
    assert type(set_fused(block, False)[0]) is ConvBNAct


def test_bad_inputs_raise_clear_errors():
    bn = nn.BatchNorm2d(4)
    with pytest.raises(ValueError, match="4-D"):
        bn_silu(torch.randn(4, 5, 5), bn, "reference")
    with pytest.raises(ValueError, match="input has 3 channels"):
        bn_silu(torch.randn(2, 3, 5, 5), bn, "reference")
    with pytest.raises(TypeError, match="unsupported dtype"):
        bn_silu(torch.ones(2, 4, 5, 5, dtype=torch.int32), bn, "reference")
    with pytest.raises(ValueError, match="fused must be"):
        bn_silu(torch.randn(2, 4, 5, 5), bn, "nope")


@pytest.mark.skipif(not cpu_built(), reason="effnet_fast._C is not built")
def test_cpu_statistics_of_a_tensor_larger_than_the_cache():
    """The channels_last statistics stream a tensor of more than 16 MiB row by row (another
    loop order than the small test shapes take): same results as the reference."""
    torch.manual_seed(7)
    y = (torch.randn(4, 72, 128, 128) * 0.5 + 3).to(memory_format=torch.channels_last)
    mean, var = kernels("cpu").bn_silu_stats(y)
    want_var, want_mean = torch.var_mean(y.double(), dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean.double(), want_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var.double(), want_var, rtol=1e-5, atol=0)
