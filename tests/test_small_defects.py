"""The smaller defects (7): NaN for an infinite input, SE weight dtype, unsupported
module settings, vmap and jit.trace, set_fused on a wrapper, autocast output dtype,
kernel-level ops called with requires_grad."""
import pytest
import torch
from torch import nn

from backend_cases import backend_params
from effnet_fast import EfficientNet
from effnet_fast import set_fused
from effnet_fast.ops import kernels, squeeze_excite_fn
from effnet_fast.ops.backends import cuda_emu_built
from safety_cases import CHANNELS, fused_layer, reference_of


@pytest.mark.parametrize("backend,device", backend_params())
def test_infinite_input_gives_nan_as_reference_in_eval(backend, device):
    layer = fused_layer("dw", backend).to(device).eval()
    with torch.no_grad():
        layer.conv.weight.zero_()
        layer.conv.weight[:, :, 1, 1] = 1
    x = torch.randn(1, CHANNELS, 3, 3, device=device)
    x[0, :, 1, 1] = torch.tensor([float("-inf"), float("inf"), float("-inf"), float("inf")])
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference_of(layer)(x), equal_nan=True)


@pytest.mark.parametrize("backend,device", backend_params())
def test_silu_kernels_give_nan_at_minus_infinity(backend, device):
    k = kernels(backend)
    x = torch.tensor([-float("inf"), float("inf"), 0.0, -3.0], device=device).view(1, 4, 1, 1)
    w = torch.zeros(4, 1, 3, 3, device=device)
    w[:, :, 1, 1] = 1
    one, zero = torch.ones(4, device=device), torch.zeros(4, device=device)
    want = torch.nn.functional.silu(x)
    torch.testing.assert_close(k.dwconv_bn_silu_forward(x, w, one, zero, 1), want, equal_nan=True)


def test_squeeze_excite_refuses_weights_of_another_dtype():
    layer = fused_layer("se", "cpu")
    x = torch.randn(2, CHANNELS, 4, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError):
        reference_of(layer)(x)
    with pytest.raises(TypeError, match="fc1 weight dtype torch.float32 differs from input dtype torch.float64"):
        squeeze_excite_fn(x, layer.fc1.weight, layer.fc1.bias, layer.fc2.weight, layer.fc2.bias, "cpu")


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("kind", ["dw", "conv"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_batch_norm_without_affine_matches_reference(backend, device, kind, train):
    layer = fused_layer(kind, backend).to(device)
    layer.bn = nn.BatchNorm2d(CHANNELS, affine=False).to(device)
    layer.train(train)
    ref = reference_of(layer)
    x = torch.randn(2, CHANNELS, 5, 5, device=device)
    torch.testing.assert_close(layer(x), ref(x), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(layer.bn.running_var, ref.bn.running_var)


@pytest.mark.parametrize("setting,value", [("padding", (2, 2)), ("dilation", (2, 2)), ("stride", (1, 2)),
                                           ("padding_mode", "reflect")])
def test_conv_settings_changed_after_construction_are_refused(setting, value):
    layer = fused_layer("dw", "cpu")
    setattr(layer.conv, setting, value)
    with pytest.raises(ValueError, match=f"FusedDWConvBNSiLU.*{setting}.*set_fused\\(False\\)"):
        layer(torch.randn(2, CHANNELS, 6, 6))


def test_vmap_of_fused_model_names_the_fused_layers():
    model = EfficientNet("b0", num_classes=10, fused="cpu").eval()
    with pytest.raises(RuntimeError, match="Fused.*vmap.*set_fused\\(False\\)"):
        torch.func.vmap(model)(torch.randn(2, 1, 3, 32, 32))


def test_jit_trace_of_fused_model_names_the_fused_layers():
    model = EfficientNet("b0", num_classes=10, fused="cpu").eval()
    with pytest.raises(RuntimeError, match="Fused.*torch.jit.trace.*set_fused\\(False\\)"):
        torch.jit.trace(model, torch.randn(1, 3, 32, 32))


def test_set_fused_on_a_wrapper_updates_the_model_flag():
    model = EfficientNet("b0", num_classes=10)
    wrapper = nn.Sequential(model)
    set_fused(wrapper, "cpu")
    assert model.fused == "cpu"
    set_fused(wrapper, False)
    assert model.fused is False


@pytest.mark.parametrize("kind", ["dw", "se", "conv"])
def test_autocast_output_dtype_matches_reference(kind):
    layer = fused_layer(kind, "cpu").train()
    ref = reference_of(layer)
    x = torch.randn(2, CHANNELS, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == ref(x).dtype


@pytest.mark.parametrize("namespace", ["effnet_fast", "effnet_fast_emu"])
def test_kernel_ops_with_requires_grad_raise(namespace):
    assert cuda_emu_built()  # loads both namespaces
    op = getattr(torch.ops, namespace).se_pool
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="kernel-level op and is not differentiable"):
        op(x)
    with torch.no_grad():
        assert op(x).shape == (2, 3)
