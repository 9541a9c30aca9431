"""The reference model: architecture, parameter counts, peers' weights, errors."""
import copy

import pytest
import torch

from backend_cases import backend_params
from effnet_fast import VARIANTS, EfficientNet, compound_scaling, round_channels
from effnet_fast.convert import KEY_MAPS, convert_state_dict, load_weights, to_layout

torchvision = pytest.importorskip("torchvision")

PARAMS = {"b0": 5_288_548, "b1": 7_794_184, "b2": 9_109_994, "b3": 12_233_232, "b4": 19_341_616,
          "b5": 30_389_784, "b6": 43_040_704, "b7": 66_347_960}


def count(model):
    return sum(p.numel() for p in model.parameters())


def randomize(model, seed=0):
    """Random weights and BN statistics, so that a mis-mapped tensor shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif "bn" in name or name.endswith((".1.weight", ".1.bias")) and t.dim() == 1:
                t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.75 if name.endswith("weight")
                        else torch.randn(t.shape, generator=g) * 0.1)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * (2.0 / max(1, t[0].numel())) ** 0.5)
    return model


@pytest.mark.parametrize("version", sorted(PARAMS))
def test_parameter_count_matches_torchvision(version):
    model = EfficientNet(version)
    assert count(model) == PARAMS[version]
    assert model.resolution == VARIANTS[version].resolution


def test_parameter_count_equals_torchvision_build():
    tv = torchvision.models.efficientnet_b3()
    assert count(EfficientNet("b3")) == count(tv)


def test_channel_rounding_and_compound_scaling():
    assert round_channels(32, 1.1) == 32 and round_channels(1280, 1.1) == 1408
    assert round_channels(40, 1.4) == 56 and round_channels(16, 1.8) == 32
    width, depth, res = compound_scaling(1)
    assert (width, depth, res) == pytest.approx((1.1, 1.2, 258))
    assert 1.2 * 1.1 ** 2 * 1.15 ** 2 == pytest.approx(2.0, abs=0.1)
    custom = EfficientNet.from_phi(1, num_classes=10)
    assert custom.resolution == 258 and custom.width == pytest.approx(1.1)
    assert custom.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize("version", ["b0", "b2", "b5"])
def test_torchvision_weights_give_same_output(version):
    torch.manual_seed(0)
    tv = randomize(getattr(torchvision.models, f"efficientnet_{version}")()).eval()
    ours = load_weights(EfficientNet(version), tv.state_dict()).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected, got = tv(x), ours(x)
    assert expected.abs().max() > 1e-3  # a meaningful output, not a collapsed one
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # and back to torchvision's keys
    back = to_layout(ours, "torchvision")
    assert back.keys() == tv.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in tv.state_dict().items())


def test_timm_weights_give_same_output():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    peer = randomize(timm.create_model("efficientnet_b0", pretrained=False)).eval()
    ours = load_weights(EfficientNet("b0"), peer.state_dict(), layout="timm").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), peer(x), atol=1e-5, rtol=0)
    assert to_layout(ours, "timm").keys() == peer.state_dict().keys()


def test_training_matches_torchvision():
    """Same loss, gradients and BN statistics in training mode (no stochastic depth, no dropout)."""
    torch.manual_seed(0)
    tv = randomize(torchvision.models.efficientnet_b0(dropout=0.0, stochastic_depth_prob=0.0)).train()
    ours = load_weights(EfficientNet("b0", dropout=0.0, stochastic_depth=0.0), tv.state_dict()).train()
    x, target = torch.randn(4, 3, 64, 64), torch.randint(0, 1000, (4,))
    loss_tv = torch.nn.functional.cross_entropy(tv(x), target)
    loss = torch.nn.functional.cross_entropy(ours(x), target)
    torch.testing.assert_close(loss, loss_tv, atol=1e-5, rtol=1e-5)
    loss_tv.backward()
    loss.backward()
    tv_params = dict(tv.named_parameters())
    for our_key, their_key in to_layout_keys(ours).items():
        if our_key in dict(ours.named_parameters()):
            torch.testing.assert_close(ours.get_parameter(our_key).grad, tv_params[their_key].grad,
                                       atol=1e-4, rtol=1e-3, msg=lambda m: f"{our_key}: {m}")
    torch.testing.assert_close(to_layout(ours), tv.state_dict(), atol=1e-5, rtol=1e-5)


def to_layout_keys(model):
    from effnet_fast.convert import torchvision_key_map
    return torchvision_key_map(model)


def test_stochastic_depth_schedule_rises_linearly_to_0_2():
    model = EfficientNet("b0")
    probs = [b.drop_path.p for b in model.mbconv_blocks() if b.use_residual]
    assert probs == sorted(probs) and max(probs) < 0.2
    assert model.mbconv_blocks()[-1].dw.conv.stride == (1, 1)


def test_se_uses_block_input_width():
    block = EfficientNet("b0").blocks[1][0]  # 16 -> 24, expanded to 96
    assert block.se.fc1.weight.shape == (4, 96, 1, 1)


def test_clear_errors():
    with pytest.raises(ValueError, match="unknown EfficientNet version 'b9'"):
        EfficientNet("b9")
    model = EfficientNet("b0", num_classes=10)
    with pytest.raises(ValueError, match="3 input channels, got 1"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="4-D"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="fused must be"):
        EfficientNet("b0", fused="metal")
    with pytest.raises(ValueError, match="unrecognised EfficientNet state dict"):
        load_weights(model, {"foo": torch.zeros(1)})
    tv = torchvision.models.efficientnet_b1()
    with pytest.raises((KeyError, ValueError)):
        convert_state_dict(model, tv.state_dict())


def test_fused_and_reference_share_state_dict_keys():
    ref = EfficientNet("b0", num_classes=10)
    fused = EfficientNet("b0", num_classes=10, fused="reference")
    assert ref.state_dict().keys() == fused.state_dict().keys()
    fused.load_state_dict(ref.state_dict())


@pytest.mark.parametrize("backend,device", backend_params())
def test_fused_model_matches_reference(backend, device):
    """Whole B0, same weights: eval output, training loss and every parameter's gradient."""
    if backend in ("triton", "cuda_emu") and device == "cpu":
        pytest.skip("whole-model runs through the Triton interpreter and the CUDA emulation are "
                    "covered by tests/test_slow.py")
    check_fused_model(backend, device, size=64 if device == "cpu" else 224)


def check_fused_model(backend, device, size, batch=2, padding="symmetric"):
    torch.manual_seed(0)
    ref = randomize(EfficientNet("b0", num_classes=10, dropout=0.0, stochastic_depth=0.0, padding=padding)).to(device)
    fused = copy.deepcopy(ref).set_fused(backend)
    x, target = torch.randn(batch, 3, size, size, device=device), torch.randint(0, 10, (batch,), device=device)
    ref.eval(), fused.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x), atol=1e-4, rtol=1e-4)
    ref.train(), fused.train()
    losses = []
    for model in (ref, fused):
        loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], atol=1e-4, rtol=1e-4)
    for (name, p_ref), p in zip(ref.named_parameters(), fused.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, atol=2e-4, rtol=2e-3, msg=lambda m: f"{name}: {m}")
    for (name, b_ref), b in zip(ref.named_buffers(), fused.buffers()):
        torch.testing.assert_close(b, b_ref, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def check_training_step_against_peer(peer, ours, layout, x, target, atol, rtol, grad_atol, grad_rtol):
    """One training step (no optimizer step) of a torchvision / timm model and of ours loaded
    from it: the same loss, each of our gradients equal to the peer's tensor that the layout's
    key map names, and the same weights and BN statistics afterwards in the peer's layout."""
    losses = []
    for model in (peer.train(), ours.train()):
        loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], atol=atol, rtol=rtol)
    theirs, key_map = dict(peer.named_parameters()), KEY_MAPS[layout](ours)
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs[key_map[name]].grad, atol=grad_atol, rtol=grad_rtol,
                                   msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(to_layout(ours, layout), peer.state_dict(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend,device", [p for p in backend_params() if p.values[0] in ("cpu", "cuda", "reference")])
def test_fused_model_under_autocast(backend, device):
    """bfloat16 autocast: the fused layers take autocast's bfloat16 activations with float32
    weights; the loss stays close to the reference model's under autocast and every gradient is
    finite. (Gradients are not compared element-wise: at this size bfloat16 alone moves the
    reference's own gradients far from its float32 ones.)"""
    torch.manual_seed(0)
    ref = randomize(EfficientNet("b0", num_classes=10, dropout=0.0, stochastic_depth=0.0)).to(device).train()
    fused = copy.deepcopy(ref).set_fused(backend)
    x, target = torch.randn(2, 3, 64, 64, device=device), torch.randint(0, 10, (2,), device=device)
    losses = []
    for model in (ref, fused):
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()
        losses.append(loss.float())
    torch.testing.assert_close(losses[1], losses[0], atol=0.05, rtol=0.05)
    assert all(torch.isfinite(p.grad).all() for p in fused.parameters())
    assert all(p.dtype == torch.float32 for p in fused.parameters())
