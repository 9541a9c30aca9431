"""TF 'same' padding in the model: EfficientNet(version, padding="same") against timm's
tf_efficientnet_b* (eval and a training step), the weight conversions both ways and
their refusals, the fused model against the reference one, and freeze."""
import pytest
import torch
import torch.nn.functional as F

from backend_cases import backend_params
from effnet_fast.ops.backends import backend_built
from effnet_fast import EfficientNet, freeze
from effnet_fast.convert import load_weights, to_layout
from effnet_fast.nn import Conv2dSame

from test_model import check_fused_model, check_training_step_against_peer, randomize

timm = pytest.importorskip("timm")

# An even size (asymmetric padding at every stride-2 conv) and one whose feature maps
# alternate between even and odd sizes (66 -> 33 -> 17 -> 9 -> 5).
SIZES = (64, 66)


def tf_pair(version="b0", drop=0.0, **ours):
    """(timm tf_efficientnet with random weights and BN statistics, ours loaded from it)."""
    torch.manual_seed(0)
    peer = timm.create_model(f"tf_efficientnet_{version}", pretrained=False, num_classes=10,
                             drop_rate=drop, drop_path_rate=drop)
    randomize(peer)
    model = EfficientNet(version, num_classes=10, padding="same", dropout=drop, stochastic_depth=drop, **ours)
    return peer, load_weights(model, peer)


def max_abs_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("fused", [False, pytest.param("cpu", marks=pytest.mark.skipif(
    not backend_built("cpu"), reason="the CPU kernels are not built"))])
@pytest.mark.parametrize("size", SIZES)
def test_matches_timm_tf_efficientnet_b0_in_eval(size, fused):
    peer, ours = tf_pair(fused=fused)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected, got = peer.eval()(x), ours.eval()(x)
    assert expected.abs().max() > 1e-2  # a meaningful output, not a collapsed one
    diff = max_abs_diff(got, expected)
    print(f"tf_efficientnet_b0 eval {size}px fused={fused}: max abs diff {diff:.3g} "
          f"(outputs up to {expected.abs().max():.3g})")
    assert diff < 1e-4, diff


def test_symmetric_model_differs_from_tf_port():
    """The parity above can fail: the same weights with symmetric padding give other outputs."""
    peer, ours = tf_pair()
    symmetric = EfficientNet("b0", num_classes=10, bn_eps=1e-3, dropout=0.0, stochastic_depth=0.0)
    symmetric.load_state_dict(ours.state_dict(), strict=False)  # leaves out the TF padding marker
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert max_abs_diff(symmetric.eval()(x), peer.eval()(x)) > 1e-2


def test_training_step_matches_timm():
    """Same loss, gradients and BN statistics after a training step (no dropout, no drop path)."""
    peer, ours = tf_pair()
    x, target = torch.randn(4, 3, 66, 66), torch.arange(4) % 10
    check_training_step_against_peer(peer, ours, "timm_tf", x, target, atol=1e-5, rtol=1e-5, grad_atol=1e-4,
                                     grad_rtol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("version", ["b1", "b2", "b3", "b4", "b5", "b6", "b7"])
def test_larger_tf_ports_match_in_eval(version):
    peer, ours = tf_pair(version)
    x = torch.randn(1, 3, 66, 66)
    with torch.no_grad():
        expected = peer.eval()(x)
        diff = max_abs_diff(ours.eval()(x), expected)
    assert diff < 1e-4 * max(1.0, expected.abs().max().item()), diff


def test_structure_and_defaults():
    model = EfficientNet("b0", padding="same")
    assert {m.eps for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {1e-3}
    strided = [name for name, m in model.named_modules() if isinstance(m, Conv2dSame)]
    assert strided == ["stem.conv"] + [f"blocks.{s}.0.dw.conv" for s in (1, 2, 3, 5)]
    assert EfficientNet("b0", padding="same", bn_eps=1e-5).stem.bn.eps == 1e-5
    assert "padding='same'" in model.extra_repr()
    markers = {f"{name}.tf_same_padding" for name in strided}  # marks the weights as TF-padded
    assert model.state_dict().keys() == EfficientNet("b0").state_dict().keys() | markers
    with pytest.raises(ValueError, match="padding must be one of"):
        EfficientNet("b0", padding="valid")


def test_bare_state_dict_loads_with_timm_tf_layout_and_converts_back():
    peer, reference = tf_pair()
    state = peer.state_dict()
    with pytest.raises(ValueError, match="layout='timm_tf'"):
        load_weights(EfficientNet("b0", num_classes=10, padding="same"), state)
    with pytest.raises(ValueError, match="layout='timm_tf'"):
        load_weights(EfficientNet("b0", num_classes=10, padding="same"), state, layout="timm")
    ours = load_weights(EfficientNet("b0", num_classes=10, padding="same"), state, layout="timm_tf")
    back = to_layout(ours, "timm_tf")
    assert back.keys() == state.keys() and all(torch.equal(back[k], v) for k, v in state.items())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), peer.eval()(x), atol=1e-4, rtol=0)


def test_tf_port_into_symmetric_model_names_the_option():
    peer, _ = tf_pair()
    for source, layout in ((peer, None), (peer.state_dict(), "timm_tf")):
        with pytest.raises(ValueError, match='padding="same"'):
            load_weights(EfficientNet("b0", num_classes=10), source, layout=layout)


def test_symmetric_weights_into_same_model_are_refused():
    torchvision = pytest.importorskip("torchvision")
    same = EfficientNet("b0", num_classes=10, padding="same")
    with pytest.raises(ValueError, match="no Conv2dSame"):
        load_weights(same, timm.create_model("efficientnet_b0", pretrained=False, num_classes=10, bn_eps=1e-3))
    with pytest.raises(ValueError, match="symmetric"):
        load_weights(same, torchvision.models.efficientnet_b0(num_classes=10).state_dict())
    # our own layout carries no padding: a same-padded model's checkpoint loads back
    load_weights(same, EfficientNet("b0", num_classes=10, padding="same").state_dict())


@pytest.mark.parametrize("backend,device", backend_params())
def test_fused_same_model_matches_reference(backend, device):
    """Whole B0 with TF padding, same weights: eval output, training loss, gradients, BN statistics."""
    if backend in ("triton", "cuda_emu") and device == "cpu":
        pytest.skip("whole-model runs through the Triton interpreter and the CUDA emulation are slow; "
                    "the layer tests (test_dwconv_bn_silu.py) cover them")
    check_fused_model(backend, device, size=66, padding="same")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("fused", [False, "cpu"])
def test_freeze_folds_tf_padding(fused, channels_last):
    """freeze folds the Conv2dSame layers too (stem and strided depthwise convs), padding
    each input as TensorFlow does: equal to timm's TF port at even and odd sizes, with
    nothing kept unfolded; and so does freeze of timm's model itself."""
    peer, ours = tf_pair()
    if fused:
        ours.set_fused(fused)
    frozen, frozen_peer = freeze(ours.eval()), freeze(peer.eval())
    assert not frozen.kept and not frozen_peer.kept, (frozen.kept, frozen_peer.kept)
    assert "TF same padding" in repr(frozen) and "TF same padding" in repr(frozen_peer)
    for size in SIZES:
        x = torch.randn(2, 3, size, size)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        with torch.no_grad():
            expected = peer(x)
            for model in (frozen, frozen_peer):
                diff = max_abs_diff(model(x), expected)
                assert diff < 1e-4 * max(1.0, expected.abs().max().item()), (size, diff)


def test_state_dict_of_ours_keeps_its_padding(tmp_path):
    """A TF-padded model's own state dict carries a marker: a symmetric model refuses it
    (and the reverse) naming the padding, and predict's loader rebuilds the TF model from
    it; weights that would load into the other padding and answer wrongly never do."""
    from effnet_fast.app.checkpoint import load_model
    _, ours = tf_pair()
    state = ours.state_dict()
    with pytest.raises(ValueError, match='padding="same"'):
        load_weights(EfficientNet("b0", num_classes=10), state)
    with pytest.raises(ValueError, match='padding="symmetric"'):
        load_weights(EfficientNet("b0", num_classes=10, padding="same"), EfficientNet("b0", num_classes=10).state_dict())
    torch.save(state, tmp_path / "tf.pt")
    loaded, _ = load_model(tmp_path / "tf.pt")
    assert loaded.padding == "same"
    x = torch.randn(2, 3, 66, 66)
    with torch.no_grad():
        assert torch.equal(loaded(x), ours.eval()(x))


def test_train_init_from_a_tf_port(tmp_path, capsys):
    """train --init with timm's TF-port weights: --init-layout timm_tf builds the TF-padded
    model (--padding same) and trains it; without --padding same it is refused by name, and
    the run's checkpoint reloads as the TF model."""
    from effnet_fast.app.checkpoint import load_model
    from effnet_fast.app.cli import main
    pytest.importorskip("sklearn")
    peer, _ = tf_pair()
    path = tmp_path / "tf_b0.pt"
    torch.save(peer.state_dict(), path)
    small = ["train", "--epochs", "1", "--size", "32", "--batch", "16", "--limit", "48", "--workers", "0",
             "--fused", "reference", "--init", str(path), "--init-layout", "timm_tf"]
    with pytest.raises(SystemExit) as exc:
        main(small + ["--out", str(tmp_path / "no.pt")])
    assert exc.value.code == 2 and "--padding same" in capsys.readouterr().err
    main(small + ["--padding", "same", "--out", str(tmp_path / "ck.pt")])
    assert "epoch 1/1" in capsys.readouterr().out
    model, _ = load_model(tmp_path / "ck.pt")
    assert model.padding == "same"


@pytest.mark.parametrize("size", [64, 65], ids=["even-asymmetric", "odd-symmetric"])
def test_frozen_tf_conv_pads_in_the_conv_where_it_can(size, monkeypatch):
    """A stride-2 TF 'same' conv whose zeros fall equally on both sides (odd sizes) takes
    them as the conv's own padding, with no pad copy; asymmetric zeros (even sizes) are
    written by one. Both equal timm's Conv2dSame."""
    import effnet_fast.nn.frozen as frozen_module
    from effnet_fast.nn.frozen import FrozenConv
    torch.manual_seed(0)
    conv = timm.layers.Conv2dSame(8, 8, 5, stride=2, groups=8, bias=False)
    frozen = FrozenConv(conv, None, act=True)
    copies, real_pad = [], F.pad
    for channels_last in (False, True):
        x = torch.randn(2, 8, size, size)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        with torch.no_grad():
            expected = F.silu(conv(x))  # timm pads with F.pad too: counted only around the frozen conv
            with monkeypatch.context() as m:
                m.setattr(frozen_module.F, "pad", lambda *a, **k: copies.append(1) or real_pad(*a, **k))
                got = frozen(x)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert bool(copies) == (size % 2 == 0), copies
