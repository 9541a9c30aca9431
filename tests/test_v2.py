"""EfficientNetV2 (EfficientNet("v2_s" | "v2_m" | "v2_l" | "v2_rw_s")): the structure and
parameter counts of torchvision's models, weights both ways with torchvision's
efficientnet_v2_* and timm's efficientnetv2_* / tf_efficientnetv2_* (eval and a training
step), the Fused-MBConv block fused on every backend against the reference, and freeze.

A deep model with random weights amplifies rounding (float32 outputs of a random V2-M are
a few percent off its own float64 outputs), so whole-model parity is checked in float64,
where every path computes the same function to 1e-9."""
import copy

import pytest
import torch
import torch.nn.functional as F

from backend_cases import GRADCHECK_BACKENDS, assert_close, backend_params
from effnet_fast import EfficientNet, freeze, set_fused
from effnet_fast.app.benchmark import calibrate_bn
from effnet_fast.convert import load_weights, to_layout
from effnet_fast.efficientnet import VARIANTS
from effnet_fast.nn import FusedMBConv
from effnet_fast.ops.backends import backend_built

from test_model import check_training_step_against_peer, randomize

torchvision = pytest.importorskip("torchvision")

# torchvision's parameter counts (1000 classes), as the issue and torchvision's docs give them.
TORCHVISION_PARAMS = {"v2_s": 21_458_488, "v2_m": 54_139_356, "v2_l": 118_515_272}
SIZE = 64
EXACT = dict(atol=1e-9, rtol=1e-9)
STEP_TOLERANCE = dict(**EXACT, grad_atol=1e-8, grad_rtol=1e-7)  # float64 gradients summed over the batch


def calibrated(model, size=SIZE):
    """Random weights, BN statistics calibrated on random images, eval mode, float64."""
    torch.manual_seed(0)
    randomize(model)
    calibrate_bn(model, torch.randn(4, 3, size, size))
    return model.eval().double()


def image(n=2, size=SIZE, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def torchvision_pair(version="v2_s"):
    peer = calibrated(getattr(torchvision.models, f"efficientnet_{version}")(
        num_classes=10, dropout=0.0, stochastic_depth_prob=0.0))
    ours = EfficientNet(version, num_classes=10, dropout=0.0, stochastic_depth=0.0).double()
    return peer, load_weights(ours, peer).eval()


def timm_pair(name, version, **kwargs):
    timm = pytest.importorskip("timm")
    peer = calibrated(timm.create_model(name, pretrained=False, num_classes=10, drop_rate=0.0, drop_path_rate=0.0))
    ours = EfficientNet(version, num_classes=10, dropout=0.0, stochastic_depth=0.0, **kwargs).double()
    return peer, load_weights(ours, peer).eval()


@pytest.mark.parametrize("version", sorted(TORCHVISION_PARAMS))
def test_parameter_counts_equal_torchvision(version):
    ours = sum(p.numel() for p in EfficientNet(version).parameters())
    assert ours == TORCHVISION_PARAMS[version]
    theirs = getattr(torchvision.models, f"efficientnet_{version}")()
    assert ours == sum(p.numel() for p in theirs.parameters())


def test_structure_follows_the_stage_table():
    model = EfficientNet("v2_s")
    kinds = [[type(b).__name__ + ("" if getattr(b, "project", 1) is not None else "-noproject") for b in stage]
             for stage in model.blocks]
    assert kinds == [["FusedMBConv-noproject"] * 2, ["FusedMBConv"] * 4, ["FusedMBConv"] * 4,
                     ["MBConv"] * 6, ["MBConv"] * 9, ["MBConv"] * 15]
    assert {m.eps for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {1e-3}
    assert model.resolution == 384 and model.classifier.in_features == 1280 and model.stem.conv.out_channels == 24
    first = model.blocks[0][0]
    assert first.use_residual and first.conv.conv.kernel_size == (3, 3)
    # stochastic depth rises linearly over all 40 blocks, as torchvision's
    probs = [b.drop_path.p for b in model.mbconv_blocks() if b.use_residual]
    assert probs[0] == 0.0 and probs == sorted(probs) and probs[-1] == pytest.approx(0.2 * 39 / 40)
    assert EfficientNet("v2_rw_s").classifier.in_features == 1792
    with pytest.raises(ValueError, match="no expand ratio"):
        FusedMBConv(8, 16, 4, 3, 1, 0.0, project=False)


@pytest.mark.parametrize("size", [SIZE, 66])
def test_matches_torchvision_v2_s(size):
    peer, ours = torchvision_pair()
    x = image(size=size)
    with torch.no_grad():
        expected = peer(x)
        assert expected.abs().max() > 1e-2
        torch.testing.assert_close(ours(x), expected, **EXACT)
    back = to_layout(ours, "torchvision")
    assert back.keys() == peer.state_dict().keys()
    fresh = getattr(torchvision.models, "efficientnet_v2_s")(num_classes=10).double()
    fresh.load_state_dict(back)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), expected, **EXACT)


def test_training_step_matches_torchvision():
    """Same loss, gradients and BN statistics after a training step."""
    peer, ours = torchvision_pair()
    check_training_step_against_peer(peer, ours, "torchvision", image(n=4), torch.arange(4) % 10, **STEP_TOLERANCE)


TIMM_MODELS = [("efficientnetv2_rw_s", "v2_rw_s", {}, "timm"),
               ("efficientnetv2_s", "v2_s", {"bn_eps": 1e-5}, "timm"),
               ("tf_efficientnetv2_s", "v2_s", {"padding": "same"}, "timm_tf")]


@pytest.mark.parametrize("name,version,kwargs,layout", TIMM_MODELS, ids=[m[0] for m in TIMM_MODELS])
def test_matches_timm_both_ways(name, version, kwargs, layout):
    """Eval at an even and an odd size (TF padding asymmetric at the stride-2 convs), and
    the weights back in timm's layout."""
    peer, ours = timm_pair(name, version, **kwargs)
    for size in (SIZE, 66):
        x = image(size=size)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), peer(x), **EXACT)
    back = to_layout(ours, layout)
    assert back.keys() == peer.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in peer.state_dict().items())
    # a bare state dict names its layout
    again = load_weights(EfficientNet(version, num_classes=10, **kwargs).double(), peer.state_dict(), layout=layout)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ours.state_dict().values()))


def test_training_step_matches_timm_tf_efficientnetv2_s():
    peer, ours = timm_pair("tf_efficientnetv2_s", "v2_s", padding="same")
    check_training_step_against_peer(peer, ours, "timm_tf", image(n=4, size=66), torch.arange(4) % 10,
                                     **STEP_TOLERANCE)


def test_refusals_name_the_problem():
    timm = pytest.importorskip("timm")
    with pytest.raises(ValueError, match='padding="same"'):
        load_weights(EfficientNet("v2_s", num_classes=10), timm.create_model("tf_efficientnetv2_s", num_classes=10))
    with pytest.raises(ValueError, match="bn_eps=1e-05"):
        load_weights(EfficientNet("v2_s", num_classes=10), timm.create_model("efficientnetv2_s", num_classes=10))
    with pytest.raises((KeyError, ValueError), match="variant"):
        load_weights(EfficientNet("v2_s", num_classes=10), torchvision.models.efficientnet_b0(num_classes=10))
    with pytest.raises((KeyError, ValueError), match="variant"):
        load_weights(EfficientNet("v2_s", num_classes=10), torchvision.models.efficientnet_v2_m(num_classes=10))


@pytest.mark.slow
@pytest.mark.parametrize("version", ["v2_m", "v2_l"])
def test_larger_v2_match_torchvision(version):
    peer, ours = torchvision_pair(version)
    x = image(n=1)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), peer(x), **EXACT)


@pytest.mark.slow
@pytest.mark.parametrize("version", ["m", "l"])
def test_larger_tf_efficientnetv2_match_timm(version):
    peer, ours = timm_pair(f"tf_efficientnetv2_{version}", f"v2_{version}", padding="same")
    x = image(n=1, size=66)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), peer(x), **EXACT)


# --- the fused path ----------------------------------------------------------------------

# (in, out, expand, stride, project, padding, size): each Fused-MBConv shape V2 has, with
# an odd size at stride 2 under TF padding (asymmetric zeros).
BLOCKS = [(8, 8, 1, 1, False, "symmetric", 9), (8, 16, 4, 2, True, "symmetric", 10),
          (8, 8, 4, 1, True, "symmetric", 9), (8, 16, 4, 2, True, "same", 9), (8, 8, 1, 1, True, "symmetric", 8)]
BLOCK_IDS = ["conv-residual", "fused-stride2", "fused-residual", "fused-stride2-same-odd", "fused-e1-project"]


def block_pair(spec, backend, dtype=torch.float32, device="cpu", n=3):
    c_in, c_out, expand, stride, project, padding, size = spec
    torch.manual_seed(0)
    ref = FusedMBConv(c_in, c_out, expand, 3, stride, 0.0, project=project, padding=padding)
    randomize(ref)
    ref = ref.to(device, dtype)
    fused = set_fused(copy.deepcopy(ref), backend)
    x = torch.randn(n, c_in, size, size, device=device, dtype=dtype)
    return ref, fused, x


@pytest.mark.parametrize("spec", BLOCKS, ids=BLOCK_IDS)
@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_fused_block_matches_reference(spec, backend, device, channels_last):
    """Output, input / conv weight / BN gradients and running statistics, training and eval."""
    ref, fused, x = block_pair(spec, backend, device=device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    for train in (True, False):
        ref.train(train), fused.train(train)
        x_ref, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_ref, out = ref(x_ref), fused(x_fused)
        grad = torch.randn_like(out_ref)
        out_ref.backward(grad)
        out.backward(grad)
        assert_close(out, out_ref, torch.float32, f"output (train={train})")
        assert_close(x_fused.grad, x_ref.grad, torch.float32, "input grad")
        for (name, p_ref), p in zip(ref.named_parameters(), fused.parameters()):
            assert_close(p.grad, p_ref.grad, torch.float32, f"grad {name}", scale=5)
            p_ref.grad = p.grad = None
        for (name, b_ref), b in zip(ref.named_buffers(), fused.buffers()):
            assert_close(b.float(), b_ref.float(), torch.float32, f"buffer {name}")


# Smaller shapes for gradcheck (two forwards per input element): the "conv" block and a
# strided one with TF padding at an odd size.
GRADCHECK_BLOCKS = [(4, 4, 1, 1, False, "symmetric", 5), (4, 8, 2, 2, True, "same", 7)]


@pytest.mark.parametrize("spec", GRADCHECK_BLOCKS, ids=["conv-residual", "fused-stride2-same-odd"])
@pytest.mark.parametrize("backend", GRADCHECK_BACKENDS)
def test_fused_block_gradcheck(spec, backend):
    if not backend_built(backend) and backend != "reference":
        pytest.skip(f"the {backend} backend is not built")
    _, fused, x = block_pair(spec, backend, dtype=torch.float64, n=1)  # few inputs: gradcheck runs 2 per element
    x.requires_grad_()
    fused.train()
    assert torch.autograd.gradcheck(lambda t: fused(t), (x,), eps=1e-6, atol=1e-6)


@pytest.mark.skipif(not backend_built("cpu"), reason="the CPU kernels are not built")
def test_fused_model_matches_reference():
    """Whole V2-S, the CPU kernels in float64: eval output, training loss, gradients and BN
    statistics equal the reference layers'."""
    ref = calibrated(EfficientNet("v2_s", num_classes=10, dropout=0.0, stochastic_depth=0.0))
    fused = copy.deepcopy(ref).set_fused("cpu")
    x, target = image(), torch.arange(2)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x), **EXACT)
    for model in (ref.train(), fused.train()):
        F.cross_entropy(model(x), target).backward()
    for (name, p_ref), p in zip(ref.named_parameters(), fused.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-8, rtol=1e-7, msg=lambda m: f"{name}: {m}")
    for (name, b_ref), b in zip(ref.named_buffers(), fused.buffers()):
        torch.testing.assert_close(b, b_ref, **EXACT, msg=lambda m: f"{name}: {m}")


# --- freeze --------------------------------------------------------------------------------

@pytest.mark.parametrize("source", ["ours", "ours-fused", "torchvision", "tf_efficientnetv2_s", "efficientnetv2_rw_s"])
def test_freeze_folds_every_v2_block(source):
    """Every block folded (nothing kept), equal to the model in float64; and in float32,
    channels_last, within the float32 model's own distance from float64."""
    if source.startswith("ours"):
        model = calibrated(EfficientNet("v2_s", num_classes=10))
        if source == "ours-fused":
            if not backend_built("cpu"):
                pytest.skip("the CPU kernels are not built")
            model.set_fused("cpu")
        size = SIZE
    elif source == "torchvision":
        model, _ = torchvision_pair()
        size = SIZE
    else:
        model, _ = timm_pair(source, "v2_s" if source.startswith("tf") else "v2_rw_s",
                             **({"padding": "same"} if source.startswith("tf") else {}))
        size = 66
    frozen = freeze(model)
    assert not frozen.kept, frozen.kept
    assert "FrozenFusedMBConv" in repr(frozen)
    x = image(size=size)
    with torch.no_grad():
        exact = model(x)
        torch.testing.assert_close(frozen(x), exact, **EXACT)
        model32 = copy.deepcopy(model).float()
        x32 = x.float().contiguous(memory_format=torch.channels_last)
        own_error = (model32(x32).double() - exact).abs().max().item()
        frozen_error = (freeze(model32)(x32).double() - exact).abs().max().item()
    assert frozen_error <= 4 * own_error + 1e-4 * exact.abs().max().item(), (frozen_error, own_error)


def test_variants_listed():
    assert {"v2_s", "v2_m", "v2_l", "v2_rw_s"} <= VARIANTS.keys()


# --- the command line ---------------------------------------------------------------------

def test_summary_lists_v2_beside_the_paper(capsys):
    from effnet_fast.app.cli import main
    main(["summary", "v2_s", "v2_m", "v2_l", "v2_rw_s", "--size", "32"])
    out = capsys.readouterr().out
    assert all(f"{count:,}" in out for count in TORCHVISION_PARAMS.values())
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("v2_")}
    assert rows["v2_s"][6:9] == ["22M", "8.80", "83.9"] and rows["v2_l"][6] == "120M"
    assert rows["v2_rw_s"][6:] == ["-", "-", "-"]  # not in the paper
    assert 8.0 < float(rows["v2_s"][5]) < 8.8  # torchvision's 8.37 GMACs at 384 px


def test_train_v2_s_and_reload(tmp_path, capsys):
    """train --version v2_s runs (the fused CPU kernels where built) and its checkpoint
    reloads as V2-S; the variant is read back from the weights' shapes."""
    pytest.importorskip("sklearn")
    from effnet_fast.app.checkpoint import infer_version, load_model
    from effnet_fast.app.cli import main
    fused = "cpu" if backend_built("cpu") else "reference"
    main(["train", "--version", "v2_s", "--epochs", "1", "--size", "32", "--batch", "8", "--limit", "16",
          "--workers", "0", "--fused", fused, "--out", str(tmp_path / "v2.pt")])
    assert "epoch 1/1" in capsys.readouterr().out
    model, _ = load_model(tmp_path / "v2.pt")
    assert model.version == "v2_s"
    assert infer_version(to_layout(model, "torchvision"), "torchvision") == "v2_s"
    assert infer_version(to_layout(model, "timm"), "timm") == "v2_s"


def test_a_non_default_bn_eps_travels_with_the_weights(tmp_path):
    """timm's efficientnetv2_s needs bn_eps=1e-5 (V2's default is torchvision's 1e-3): our
    state dict of such a model records its eps, so a default model refuses it naming the
    option (and the reverse), and predict's loader rebuilds the model with it. Without the
    record the weights would load into eps 1e-3 and answer differently."""
    from effnet_fast.app.checkpoint import load_model
    peer, ours = timm_pair("efficientnetv2_s", "v2_s", bn_eps=1e-5)
    state = ours.state_dict()
    assert float(state["bn_eps"]) == 1e-5 and "bn_eps" not in EfficientNet("v2_s").state_dict()
    with pytest.raises(ValueError, match="bn_eps=1e-05"):
        load_weights(EfficientNet("v2_s", num_classes=10).double(), state)
    with pytest.raises(ValueError, match="no bn_eps"):
        load_weights(ours, EfficientNet("v2_s", num_classes=10).double().state_dict())
    torch.save(state, tmp_path / "v2_eps.pt")
    loaded, _ = load_model(tmp_path / "v2_eps.pt")
    assert loaded.stem.bn.eps == 1e-5
    x = image()
    with torch.no_grad():
        torch.testing.assert_close(loaded.double()(x), peer(x), **EXACT)
        default = EfficientNet("v2_s", num_classes=10).double().eval()
        default.load_state_dict({k: v for k, v in state.items() if k != "bn_eps"})
        assert (default(x) - peer(x)).abs().max() > 1e-6  # what the record prevents
    # a low-precision copy keeps its record close enough
    load_weights(EfficientNet("v2_s", num_classes=10, bn_eps=1e-5), copy.deepcopy(ours).bfloat16().state_dict())
