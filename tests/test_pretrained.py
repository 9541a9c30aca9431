"""EfficientNet.from_pretrained: torchvision's and timm's weights by name, read from local
files here (file=; nothing downloads in the tests), equal to the source model, with the
source's preprocessing kept; bad names refused by name."""
import pytest
import torch

from effnet_fast import EfficientNet
from effnet_fast.pretrained import is_pretrained_name

from test_model import randomize


def _saved(peer, path):
    randomize(peer)
    torch.save(peer.state_dict(), path)
    return peer.eval()


def _same_outputs(model, peer, size=64):
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = peer(x)
        diff = (model(x) - expected).abs().max().item()
    assert diff < 1e-4 * max(1.0, expected.abs().max().item()), diff


def test_torchvision_weights_by_name(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    peer = _saved(torchvision.models.efficientnet_b0(), tmp_path / "tv.pth")
    model = EfficientNet.from_pretrained("torchvision:efficientnet_b0.IMAGENET1K_V1", file=tmp_path / "tv.pth")
    assert model.version == "b0" and model.padding == "symmetric" and not model.training
    _same_outputs(model, peer)
    pre = model.pretrained
    assert (pre["size"], pre["crop_fraction"], pre["interpolation"]) == (224, 224 / 256, "bicubic")
    assert pre["mean"] == (0.485, 0.456, 0.406) and len(pre["classes"]) == 1000 and pre["classes"][1] == "goldfish"


@pytest.mark.parametrize("name, padding", [("tf_efficientnet_b0.ns_jft_in1k", "same"),
                                           ("efficientnet_b0.ra_in1k", "symmetric")])
def test_timm_weights_by_name(tmp_path, name, padding):
    timm = pytest.importorskip("timm")
    peer = _saved(timm.create_model(name.split(".")[0]), tmp_path / "timm.pth")
    model = EfficientNet.from_pretrained(f"timm:{name}", file=tmp_path / "timm.pth", fused="cpu" if padding == "same"
                                         else False)
    assert model.padding == padding
    _same_outputs(model, peer, size=66)
    assert model.pretrained["crop_fraction"] == peer.pretrained_cfg["crop_pct"]
    assert model.pretrained["classes"][0].startswith("tench")


@pytest.mark.parametrize("name, version, padding, eps", [
    ("torchvision:efficientnet_v2_s.IMAGENET1K_V1", "v2_s", "symmetric", 1e-3),
    ("timm:tf_efficientnetv2_s.in21k_ft_in1k", "v2_s", "same", 1e-3),
    ("timm:efficientnetv2_rw_s.ra2_in1k", "v2_rw_s", "symmetric", 1e-5),
])
def test_efficientnet_v2_weights_by_name(tmp_path, name, version, padding, eps):
    """V2 by name, its padding and BatchNorm eps taken from the source model; compared in
    float64 (a random deep V2 amplifies float32 rounding)."""
    source, _, arch = name.partition(":")
    lib = pytest.importorskip(source)
    arch = arch.split(".")[0]
    peer = lib.models.get_model(arch) if source == "torchvision" else lib.create_model(arch)
    peer = _saved(peer, tmp_path / "v2.pth")
    model = EfficientNet.from_pretrained(name, file=tmp_path / "v2.pth")
    assert (model.version, model.padding, model.stem.bn.eps) == (version, padding, eps)
    x = torch.randn(1, 3, 66, 66, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model.double()(x), peer.double()(x), atol=1e-9, rtol=1e-9)
    assert model.pretrained["size"] == (384 if source == "torchvision" else peer.pretrained_cfg["input_size"][-1])


@pytest.mark.parametrize("name, message", [
    ("efficientnet_b0", "expected '<source>:<model>'"),
    ("keras:efficientnet_b0", "source one of"),
    ("torchvision:efficientnet_b0.NOPE", "torchvision lists IMAGENET1K_V1"),
    ("timm:efficientnetv2_rw_t", "not an EfficientNet B0-B7 or EfficientNetV2 S/M/L"),
    ("timm:mobilenetv3_large_100", "not an EfficientNet B0-B7"),
])
def test_bad_names_are_refused_by_name(name, message):
    pytest.importorskip("torchvision")
    pytest.importorskip("timm")
    with pytest.raises(ValueError, match=message):
        EfficientNet.from_pretrained(name)


def test_pretrained_names():
    assert is_pretrained_name("timm:tf_efficientnet_b0") and is_pretrained_name("torchvision:efficientnet_b1")
    assert not is_pretrained_name("checkpoints/train.pt") and not is_pretrained_name("c:/weights.pt")


def test_cli_takes_pretrained_names(tmp_path, monkeypatch, capsys):
    """predict --weights NAME and train --init NAME, the download replaced by a local
    state dict (the call checked: torchvision's URL, tensors only)."""
    torchvision = pytest.importorskip("torchvision")
    pytest.importorskip("PIL")
    pytest.importorskip("sklearn")  # train's default data set, the digits
    from PIL import Image

    from effnet_fast.app.cli import main, parse
    state = _saved(torchvision.models.efficientnet_b0(), tmp_path / "tv.pth").state_dict()
    calls = []

    def fake_download(url, **kwargs):
        calls.append((url, kwargs))
        return state
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    image = tmp_path / "x.png"
    Image.fromarray((torch.rand(40, 50, 3) * 255).to(torch.uint8).numpy()).save(image)
    main(["predict", str(image), "--weights", "torchvision:efficientnet_b0", "--topk", "2"])
    assert capsys.readouterr().out.startswith(f"{image}: ")
    assert calls[0][0].endswith("efficientnet_b0_rwightman-7f5810bc.pth") and calls[0][1]["weights_only"]
    _, inputs = parse(["train", "--epochs", "1", "--size", "32", "--batch", "16", "--limit", "48", "--workers", "0",
                       "--init", "torchvision:efficientnet_b0.IMAGENET1K_V1"])
    assert inputs.init_state["new_classifier"] and inputs.init_state["layout"] == "effnet_fast"
