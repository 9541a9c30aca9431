"""Loading weights: only tensors are unpickled, TF ports are refused by the symmetric-padding
model (they load into EfficientNet(..., padding="same"), tests/test_tf_same.py), a failed load
changes nothing, strict=False holds for every layout (defects 1, 5 and 7)."""
import os

import pytest
import torch
import torchvision

from effnet_fast import EfficientNet
from effnet_fast.convert import load_weights, to_layout


class _RunsCodeWhenUnpickled:
    def __reduce__(self):
        return (os.system, ("touch pwned_by_checkpoint",))


def test_url_checkpoint_is_loaded_weights_only(tmp_path, monkeypatch):
    """Defect 1: a checkpoint from a URL (here already in the hub cache) must not run code."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    os.makedirs(tmp_path / "hub" / "checkpoints")
    torch.save({"stem.conv.weight": _RunsCodeWhenUnpickled()}, tmp_path / "hub" / "checkpoints" / "evil.pth")
    with pytest.raises(Exception, match="(?i)weights.only|unpickl"):
        load_weights(EfficientNet("b0"), "https://example.invalid/evil.pth")
    assert not (tmp_path / "pwned_by_checkpoint").exists()


def test_tf_ported_timm_model_is_refused():
    """Defect 5: tf_efficientnet_* needs 'same' padding and eps 1e-3; loading it must fail clearly."""
    timm = pytest.importorskip("timm")
    tf_port = timm.create_model("tf_efficientnet_b0", pretrained=False)
    with pytest.raises(ValueError, match="Conv2dSame.*TF.*padding=\"same\""):
        load_weights(EfficientNet("b0"), tf_port)


def test_timm_model_object_with_other_bn_eps_is_refused():
    timm = pytest.importorskip("timm")
    peer = timm.create_model("efficientnet_b0", pretrained=False, bn_eps=1e-3)
    with pytest.raises(ValueError, match="eps"):
        load_weights(EfficientNet("b0"), peer)


def test_timm_model_object_loads():
    timm = pytest.importorskip("timm")
    peer = timm.create_model("efficientnet_b0", pretrained=False).eval()
    ours = load_weights(EfficientNet("b0"), peer).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), peer(x), atol=1e-4, rtol=1e-4)


def test_bare_timm_state_dict_needs_explicit_layout():
    """Defect 5: a timm state dict cannot tell efficientnet_b* from tf_efficientnet_b*."""
    state = to_layout(EfficientNet("b0"), "timm")
    with pytest.raises(ValueError, match="layout='timm'.*tf_efficientnet"):
        load_weights(EfficientNet("b0"), state)
    with pytest.raises(ValueError, match="'same' padding"):
        load_weights(EfficientNet("b0"), state, layout="timm_tf")
    load_weights(EfficientNet("b0"), state, layout="timm")


def test_wrong_variant_load_leaves_model_unchanged():
    """Defect 7: loading our own layout from another variant must load all or nothing."""
    model = EfficientNet("b0", num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    other = EfficientNet("b1", num_classes=10).state_dict()
    with pytest.raises((KeyError, ValueError), match="nothing was loaded"):
        load_weights(model, other)
    with pytest.raises(ValueError, match="nothing was loaded"):
        load_weights(model, EfficientNet("b0", num_classes=5).state_dict(), strict=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("layout", ["torchvision", "timm"])
def test_strict_false_holds_for_peer_layouts(layout):
    """Defect 7: strict=False lets a peer's state dict miss or add tensors, as load_state_dict does."""
    model = EfficientNet("b0", num_classes=10)
    state = to_layout(EfficientNet("b0", num_classes=10), layout)
    classifier_keys = [k for k in state if "classifier" in k]
    for k in classifier_keys:
        del state[k]
    state["extra.weight"] = torch.zeros(1)
    before = model.classifier.weight.clone()
    load_weights(model, state, layout=layout, strict=False)
    assert torch.equal(model.classifier.weight, before)
    with pytest.raises((KeyError, ValueError)):
        load_weights(model, state, layout=layout)


def test_torchvision_model_object_loads():
    tv = torchvision.models.efficientnet_b0().eval()
    ours = load_weights(EfficientNet("b0"), tv).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tv(x), atol=1e-4, rtol=1e-4)
