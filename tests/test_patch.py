"""effnet_fast.patch on torchvision and timm EfficientNets: the patched model computes what
the original computes (eval, training step: outputs, gradients, BN statistics), keeps its
state_dict, unpatches to the original objects, and leaves alone what it cannot fuse."""
import copy
import sys

import pytest
import torch
import torch.nn.functional as F

import effnet_fast
from effnet_fast import freeze
from effnet_fast.app.benchmark import calibrate_bn
from effnet_fast.ops.backends import backend_built
from effnet_fast.patch import ORIGINAL, Patched

from test_model import randomize

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

pytestmark = pytest.mark.skipif(not backend_built("cpu"), reason="the CPU kernels are not built")

SIZE = 64
BLOCKS_B0 = 16


def build(family, version, drop=0.0):
    """A model with random weights, BN statistics calibrated on random images, in eval mode."""
    torch.manual_seed(0)
    if family == "torchvision":
        model = getattr(torchvision.models, f"efficientnet_{version}")(
            num_classes=10, dropout=drop, stochastic_depth_prob=drop)
    else:
        model = timm.create_model(f"{family}_{version}", pretrained=False, num_classes=10,
                                  drop_rate=drop, drop_path_rate=drop)
    randomize(model)
    calibrate_bn(model, torch.randn(4, 3, SIZE, SIZE))
    return model.eval()


def pair(family, version, channels_last, drop=0.0):
    """(original, patched copy, report)."""
    original = build(family, version, drop)
    patched = copy.deepcopy(original)
    report = effnet_fast.patch(patched)
    if channels_last:
        original, patched = (m.to(memory_format=torch.channels_last) for m in (original, patched))
    return original, patched, report


def image(channels_last, n=2, seed=1):
    x = torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
    return x.to(memory_format=torch.channels_last) if channels_last else x


def close(actual, expected, msg="", rtol=2e-3, atol=0.0):
    """float32 agreement scaled to the tensor's magnitude: the fused ops round differently and
    deep layers amplify it; a wrong layer gives errors of the tensor's own size."""
    atol = max(atol, rtol * max(1e-3, expected.abs().max().item()))
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{msg}{m}")


def check_eval(original, patched, channels_last):
    """The patched output within a few times the original's own float32 error (measured
    against the original in float64: a randomly initialised B5-B7 is ill-conditioned)."""
    x = image(channels_last)
    with torch.no_grad():
        expected, actual = original(x), patched(x)
        exact = copy.deepcopy(original).double()(x.double()).float()
        frozen = freeze(patched)(x)
    tolerance = 4 * (expected - exact).abs().max().item()
    close(actual, expected, "eval output: ", atol=tolerance)
    close(frozen, expected, "frozen eval output: ", atol=tolerance)


def check_training_step(original, patched, channels_last):
    x, target = image(channels_last, n=4), torch.arange(4) % 10
    outputs = []
    for model in (original, patched):
        model.train()
        out = model(x)
        F.cross_entropy(out, target).backward()
        outputs.append(out.detach())
    close(outputs[1], outputs[0], "training output: ")
    patched_params = dict(patched.named_parameters())
    for name, p in original.named_parameters():
        # a gradient summed over the batch can nearly cancel: tolerance 1% of its largest entry
        close(patched_params[name].grad, p.grad, f"grad {name}: ", rtol=1e-2)
    patched_buffers = dict(patched.named_buffers())
    for name, b in original.named_buffers():
        if b.is_floating_point():
            close(patched_buffers[name], b, f"buffer {name}: ")
        else:
            assert torch.equal(patched_buffers[name], b), name


def assert_blocks_patched(model, blocks):
    block_types = ("MBConv", "InvertedResidual", "DepthwiseSeparableConv")
    found = [m for m in model.modules() if type(m.__dict__.get(ORIGINAL, m)).__name__ in block_types]
    assert len(found) == blocks and all(isinstance(m, Patched) for m in found)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("family", ["torchvision", "efficientnet"])
def test_b0_matches_original(family, channels_last):
    original, patched, report = pair(family, "b0", channels_last)
    assert len(report.replaced) == BLOCKS_B0 + 2 and not report.left_alone, report
    assert_blocks_patched(patched, BLOCKS_B0)
    check_eval(original, patched, channels_last)
    check_training_step(original, patched, channels_last)


@pytest.mark.slow
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("family,version", [("torchvision", f"b{i}") for i in range(1, 8)]
                         + [("efficientnet", f"b{i}") for i in range(1, 4)])
def test_larger_variants_match_original(family, version, channels_last):
    original, patched, report = pair(family, version, channels_last)
    assert not report.left_alone, report
    check_eval(original, patched, channels_last)
    check_training_step(original, patched, channels_last)


V2_MODELS = [("torchvision", "v2_s"), ("tf_efficientnetv2", "s"),
             pytest.param("efficientnetv2_rw", "s", marks=pytest.mark.slow)]
V2_S_MBCONV_BLOCKS = 6 + 9 + 15


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("family,version", V2_MODELS)
def test_efficientnet_v2_matches_original(family, version, channels_last):
    """EfficientNetV2: its MBConv blocks patched whole; in its Fused-MBConv blocks the conv
    + BN + SiLU layers (torchvision's Conv2dNormActivation, timm's BatchNormAct2d) run the
    fused BN + SiLU op. Nothing left alone; outputs, gradients and BN statistics equal."""
    original, patched, report = pair(family, version, channels_last)
    assert not report.left_alone, report
    assert_blocks_patched(patched, V2_S_MBCONV_BLOCKS)
    fused_mbconv = [m for m in patched.modules() if type(m).__name__ in ("FusedMBConv", "EdgeResidual", "ConvBnAct")]
    assert fused_mbconv and all(any(isinstance(c, Patched) for c in m.modules()) for m in fused_mbconv)
    check_eval(original, patched, channels_last)
    check_training_step(original, patched, channels_last)


@pytest.mark.parametrize("family", ["torchvision", "efficientnet"])
def test_stochastic_depth_draws_the_same_masks(family):
    original, patched, _ = pair(family, "b0", False, drop=0.5)
    x = image(False)
    outputs = []
    for model in (original, patched):
        model.train()
        torch.manual_seed(7)
        with torch.no_grad():
            outputs.append(model(x))
    close(outputs[1], outputs[0])


def test_state_dict_loads_both_ways():
    original, patched, _ = pair("torchvision", "b0", False)
    assert list(patched.state_dict()) == list(original.state_dict())
    fresh = build("torchvision", "b0")
    randomize(fresh, seed=5)
    fresh.load_state_dict(patched.state_dict())
    x = image(False)
    with torch.no_grad():
        close(fresh(x), original(x))
    other = copy.deepcopy(patched)
    randomize(other, seed=6)
    other.load_state_dict(fresh.state_dict())
    with torch.no_grad():
        close(other(x), original(x))


@pytest.mark.parametrize("family", ["torchvision", "efficientnet"])
def test_unpatch_restores_the_original_modules(family):
    model = build(family, "b0")
    before = list(model.named_modules())
    effnet_fast.patch(model)
    assert any(isinstance(m, Patched) for m in model.modules())
    model.train()
    effnet_fast.unpatch(model)
    after = list(model.named_modules())
    assert [name for name, _ in after] == [name for name, _ in before]
    assert all(a is b for (_, a), (_, b) in zip(after, before))
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_tf_efficientnet_b0_fuses_conv2d_same(channels_last):
    """The TF port's strided depthwise convs (Conv2dSame) run the fused op with TF 'same'
    padding: outputs, gradients and BN statistics equal to the unpatched model, nothing
    left alone, and the report names them."""
    original, patched, report = pair("tf_efficientnet", "b0", channels_last)
    same = [name for name, m in original.named_modules() if type(m).__name__ == "Conv2dSame"]
    assert len(same) == 5
    assert len(report.replaced) == BLOCKS_B0 + 2 and not report.left_alone, report
    assert sorted(report.same_padding) == sorted(name.removesuffix(".conv_dw") + " depthwise"
                                                 for name in same if name != "conv_stem")
    assert "TF 'same' padding" in str(report)
    assert [type(m).__name__ for name, m in patched.named_modules() if name in same] == ["Conv2dSame"] * 5
    assert_blocks_patched(patched, BLOCKS_B0)
    strided = patched.get_submodule(same[1].removesuffix(".conv_dw"))
    assert type(strided._views()["dw"]).__name__ == "FusedDWConvBNSiLU"
    check_eval(original, patched, channels_last)
    check_training_step(original, patched, channels_last)


def test_unsupported_layers_are_left_alone():
    """A depthwise conv with a kernel size or dilation the fused ops do not compute, or an
    activation other than SiLU, runs as the original and is named in the report."""
    original = build("torchvision", "b0")
    original.features[1][0].block[0][0].dilation = (2, 2)
    original.features[1][0].block[0][0].padding = (2, 2)
    original.features[2][0].block[2].activation = torch.nn.ReLU()
    patched = copy.deepcopy(original)
    report = effnet_fast.patch(patched)
    reasons = dict(report.left_alone)
    assert "dilated" in reasons["features.1.0 depthwise"]
    assert "ReLU" in reasons["features.2.0 squeeze-excitation + projection"]
    check_eval(original, patched, False)
    check_training_step(original, patched, False)


def test_patched_timm_batch_norm_act_runs_the_fused_op(monkeypatch):
    """The stem's and head's BatchNormAct2d adapters call bn_silu (not their reference forward),
    and freezing the patched model folds them."""
    original = build("efficientnet", "b0").to(memory_format=torch.channels_last)
    patched = copy.deepcopy(original)
    effnet_fast.patch(patched, "cpu")
    patch_module = sys.modules["effnet_fast.patch"]  # effnet_fast.patch is the function
    calls, real = [], patch_module.bn_silu
    monkeypatch.setattr(patch_module, "bn_silu", lambda *a, **k: calls.append(1) or real(*a, **k))
    check_eval(original, patched, channels_last=True)
    assert len(calls) >= 2
    assert not effnet_fast.freeze(patched).kept
