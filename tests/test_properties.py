"""Property-based comparison of every fused layer with its reference layer: random
shapes, layouts (NCHW, channels_last, strided views), dtypes the backend claims,
kernel sizes, strides, training and eval. A short derandomized run by default; a
longer random one with `-m slow`."""
import copy

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from backend_cases import BACKEND_DTYPES, assert_close, forward_backward_pair
from effnet_fast.nn import ConvBNAct, DWConvBNSiLU, SqueezeExcitation
from effnet_fast import set_fused
from effnet_fast.ops.backends import REGISTRY, _why_unusable
from effnet_fast.ops.common import acc_dtype, conv_out_size

BACKENDS = [b for b in REGISTRY if _why_unusable(b, torch.device("cpu")) is None]
KINDS = ("dw", "se", "conv")
SHORT = dict(max_examples=15, derandomize=True)
LONG = dict(max_examples=60)
COMMON = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck))


def reference_layer(kind, c, k, stride, acc):
    if kind == "dw":
        layer = DWConvBNSiLU(c, k, stride)
    elif kind == "se":
        layer = SqueezeExcitation(c, max(1, c // 2))
    else:
        layer = ConvBNAct(c, c + 1, 1)
    with torch.no_grad():
        for name, t in layer.named_parameters():
            t.copy_(torch.randn_like(t) * 0.5 + (1.0 if name.endswith("bn.weight") else 0.0))
        if hasattr(layer, "bn"):
            layer.bn.running_mean.uniform_(-0.5, 0.5)
            layer.bn.running_var.uniform_(0.5, 2.0)
    return layer.to(acc)


def fused_pair(kind, c, k, stride, dtype, backend):
    """(reference in the accumulation dtype, fused in `dtype`) holding the same values."""
    acc = acc_dtype(dtype)
    ref = reference_layer(kind, c, k, stride, acc)
    fused = set_fused(nn.Sequential(copy.deepcopy(ref).to(dtype)), backend)[0]
    ref.load_state_dict({n: t.to(acc) if t.is_floating_point() else t for n, t in fused.state_dict().items()})
    return ref, fused


def make_input(n, c, h, w, dtype, layout):
    x = torch.randn(n, c, h, 2 * w if layout == "strided" else w) * 1.5 + 0.3
    if layout == "strided":
        x = x[..., ::2]
    elif layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x.to(dtype)


@st.composite
def cases(draw, backend):
    return dict(n=draw(st.integers(1, 3)), c=draw(st.integers(1, 6)), h=draw(st.integers(1, 8)),
                w=draw(st.integers(1, 8)), k=draw(st.sampled_from([3, 5])), stride=draw(st.sampled_from([1, 2])),
                dtype=draw(st.sampled_from(BACKEND_DTYPES[backend])),
                layout=draw(st.sampled_from(["nchw", "channels_last", "strided"])), train=draw(st.booleans()))


def check_layer_matches_reference(kind, backend, case):
    n, c, h, w, k, stride, dtype = (case[key] for key in ("n", "c", "h", "w", "k", "stride", "dtype"))
    out_h, out_w = (conv_out_size(h, k, stride), conv_out_size(w, k, stride)) if kind == "dw" else (h, w)
    assume(not (case["train"] and kind != "se" and n * out_h * out_w == 1))  # BatchNorm refuses it
    torch.manual_seed(0)
    ref, fused = fused_pair(kind, c, k, stride, dtype, backend)
    ref.train(case["train"]), fused.train(case["train"])
    x = make_input(n, c, h, w, dtype, case["layout"])
    x_ref, x_fused, out_ref, out = forward_backward_pair(ref, fused, x, dtype)
    low_precision = 1.0 if dtype in (torch.float32, torch.float64) else 4.0
    assert out.dtype == dtype and out.shape == out_ref.shape
    assert_close(out, out_ref, dtype, f"{kind} output", low_precision)
    assert_close(x_fused.grad, x_ref.grad, dtype, f"{kind} grad input", 4 * low_precision)
    for (name, p_ref), p in zip(ref.named_parameters(), fused.parameters()):
        assert_close(p.grad, p_ref.grad, dtype, f"{kind} grad {name}", 8 * low_precision)


def property_test(kind, backend, profile):
    @settings(**profile, **COMMON)
    @given(case=cases(backend))
    def run(case):
        check_layer_matches_reference(kind, backend, case)
    run()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_fused_layer_matches_reference_property(kind, backend):
    property_test(kind, backend, SHORT)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_fused_layer_matches_reference_property_long(kind, backend):
    property_test(kind, backend, LONG)
