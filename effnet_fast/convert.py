"""Weights from and to torchvision's and timm's EfficientNet layouts.

Our keys: stem.{conv,bn}, blocks.S.J.{expand,dw,project}.{conv,bn}, blocks.S.J.se.{fc1,fc2},
head.{conv,bn}, classifier. The maps are built from the model's own structure, so
they hold for every variant (the peers' layouts differ only in names)."""
import os

import torch

from .layers import MBConv

_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _conv_bn(ours, theirs_conv, theirs_bn):
    pairs = {f"{ours}.conv.weight": f"{theirs_conv}.weight"}
    pairs.update({f"{ours}.bn.{p}": f"{theirs_bn}.{p}" for p in _BN})
    return pairs


def _se(ours, theirs_fc1, theirs_fc2):
    return {f"{ours}.se.{fc}.{p}": f"{theirs}.{p}"
            for fc, theirs in (("fc1", theirs_fc1), ("fc2", theirs_fc2)) for p in ("weight", "bias")}


def _blocks(model):
    for s, stage in enumerate(model.blocks):
        for j, block in enumerate(stage):
            assert isinstance(block, MBConv)
            yield s, j, block


def torchvision_key_map(model):
    """{our key: torchvision key} for `model` (an effnet_fast.EfficientNet)."""
    km = _conv_bn("stem", "features.0.0", "features.0.1")
    for s, j, block in _blocks(model):
        ours, theirs = f"blocks.{s}.{j}", f"features.{s + 1}.{j}.block"
        i = 0
        if block.expand is not None:
            km.update(_conv_bn(f"{ours}.expand", f"{theirs}.0.0", f"{theirs}.0.1"))
            i = 1
        km.update(_conv_bn(f"{ours}.dw", f"{theirs}.{i}.0", f"{theirs}.{i}.1"))
        km.update(_se(ours, f"{theirs}.{i + 1}.fc1", f"{theirs}.{i + 1}.fc2"))
        km.update(_conv_bn(f"{ours}.project", f"{theirs}.{i + 2}.0", f"{theirs}.{i + 2}.1"))
    head = len(model.blocks) + 1
    km.update(_conv_bn("head", f"features.{head}.0", f"features.{head}.1"))
    km.update({"classifier.weight": "classifier.1.weight", "classifier.bias": "classifier.1.bias"})
    return km


def timm_key_map(model):
    """{our key: timm key} for timm's `efficientnet_b*` layout."""
    km = _conv_bn("stem", "conv_stem", "bn1")
    for s, j, block in _blocks(model):
        ours, theirs = f"blocks.{s}.{j}", f"blocks.{s}.{j}"
        if block.expand is not None:
            km.update(_conv_bn(f"{ours}.expand", f"{theirs}.conv_pw", f"{theirs}.bn1"))
            km.update(_conv_bn(f"{ours}.dw", f"{theirs}.conv_dw", f"{theirs}.bn2"))
            km.update(_conv_bn(f"{ours}.project", f"{theirs}.conv_pwl", f"{theirs}.bn3"))
        else:  # timm's DepthwiseSeparableConv
            km.update(_conv_bn(f"{ours}.dw", f"{theirs}.conv_dw", f"{theirs}.bn1"))
            km.update(_conv_bn(f"{ours}.project", f"{theirs}.conv_pw", f"{theirs}.bn2"))
        km.update(_se(ours, f"{theirs}.se.conv_reduce", f"{theirs}.se.conv_expand"))
    km.update(_conv_bn("head", "conv_head", "bn2"))
    km.update({"classifier.weight": "classifier.weight", "classifier.bias": "classifier.bias"})
    return km


KEY_MAPS = {"torchvision": torchvision_key_map, "timm": timm_key_map}


def detect_layout(state_dict):
    """'effnet_fast', 'torchvision' or 'timm', from the keys of a state dict."""
    keys = state_dict.keys()
    if "stem.conv.weight" in keys:
        return "effnet_fast"
    if "features.0.0.weight" in keys:
        return "torchvision"
    if "conv_stem.weight" in keys:
        return "timm"
    raise ValueError("unrecognised EfficientNet state dict: expected effnet_fast, torchvision or timm keys, "
                     f"got e.g. {list(keys)[:3]}")


def convert_state_dict(model, state_dict, layout=None):
    """`state_dict` (in `layout`, detected when None) translated to `model`'s keys.
    Missing keys (e.g. num_batches_tracked of older checkpoints) are left out; a
    shape mismatch raises ValueError naming the tensor."""
    layout = layout or detect_layout(state_dict)
    if layout == "effnet_fast":
        return dict(state_dict)
    km = KEY_MAPS[layout](model)
    ours = model.state_dict()
    out = {}
    for our_key, their_key in km.items():
        if their_key not in state_dict:
            if our_key.endswith("num_batches_tracked"):
                continue
            raise KeyError(f"{layout} state dict has no {their_key!r} (for {our_key!r}); "
                           f"is it a different EfficientNet variant?")
        t = state_dict[their_key]
        if t.shape != ours[our_key].shape:
            raise ValueError(f"{their_key} has shape {tuple(t.shape)} but {our_key} needs "
                             f"{tuple(ours[our_key].shape)}: different variant or num_classes?")
        out[our_key] = t
    unused = set(state_dict) - set(km.values())
    if unused:
        raise ValueError(f"{len(unused)} {layout} tensors have no place in this model, e.g. {sorted(unused)[:3]}")
    return out


def to_layout(model, layout="torchvision"):
    """`model`'s state dict in a peer's layout ('torchvision' or 'timm')."""
    ours = model.state_dict()
    return {theirs: ours[our_key] for our_key, theirs in KEY_MAPS[layout](model).items()}


def load_weights(model, source, layout=None, strict=True):
    """Load weights into `model` from a state dict, a local file, or a URL (needs a
    network), in our, torchvision's or timm's layout. Returns the model."""
    if isinstance(source, (str, os.PathLike)):
        source = str(source)
        if source.startswith(("http://", "https://")):
            state = torch.hub.load_state_dict_from_url(source, map_location="cpu", check_hash=False)
        else:
            state = torch.load(source, map_location="cpu", weights_only=True)
    else:
        state = source
    if isinstance(state, dict) and "state_dict" in state and not torch.is_tensor(state["state_dict"]):
        state = state["state_dict"]  # a training checkpoint
    model.load_state_dict(convert_state_dict(model, state, layout), strict=strict)
    return model
