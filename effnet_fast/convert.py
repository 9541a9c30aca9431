"""Weights from and to torchvision's and timm's EfficientNet layouts.

Our keys: stem.{conv,bn}, blocks.S.J.{expand,dw,project}.{conv,bn}, blocks.S.J.se.{fc1,fc2},
head.{conv,bn}, classifier; EfficientNetV2's Fused-MBConv blocks blocks.S.J.{conv,project}.{conv,bn}. The maps are built from the model's own structure, so
they hold for every variant (the peers' layouts differ only in names).

timm's TF ports (`tf_efficientnet_b*`, `tf_efficientnetv2_*`) have the same keys and shapes
as its `efficientnet_b*` / `efficientnetv2_*` but need TF 'same' padding and BatchNorm eps 1e-3: they load into
`EfficientNet(version, padding="same")` only, and the symmetric-padding model refuses
them. A timm state dict cannot be told apart from its keys, so loading one needs
`layout="timm"` (efficientnet_b*) or `layout="timm_tf"` (tf_efficientnet_b*), or the
timm model object, which is checked."""
import os

import torch
from torch import nn

from .nn.layers import (BN_EPS_MARKER, SAME_PADDING_MARKER, FusedMBConv, MBConv, bn_eps_marker,
                        has_same_padding_marker)

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
            assert isinstance(block, (MBConv, FusedMBConv))
            yield s, j, block


def torchvision_key_map(model):
    """{our key: torchvision key} for `model` (an effnet_fast.EfficientNet)."""
    km = _conv_bn("stem", "features.0.0", "features.0.1")
    for s, j, block in _blocks(model):
        ours, theirs = f"blocks.{s}.{j}", f"features.{s + 1}.{j}.block"
        if isinstance(block, FusedMBConv):  # torchvision's FusedMBConv: [conv, project]
            km.update(_conv_bn(f"{ours}.conv", f"{theirs}.0.0", f"{theirs}.0.1"))
            if block.project is not None:
                km.update(_conv_bn(f"{ours}.project", f"{theirs}.1.0", f"{theirs}.1.1"))
            continue
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
        if isinstance(block, FusedMBConv):
            if block.project is None:  # timm's ConvBnAct
                km.update(_conv_bn(f"{ours}.conv", f"{theirs}.conv", f"{theirs}.bn1"))
            else:  # timm's EdgeResidual
                km.update(_conv_bn(f"{ours}.conv", f"{theirs}.conv_exp", f"{theirs}.bn1"))
                km.update(_conv_bn(f"{ours}.project", f"{theirs}.conv_pwl", f"{theirs}.bn2"))
            continue
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


TF_PORT_LAYOUT = "timm_tf"
KEY_MAPS = {"torchvision": torchvision_key_map, "timm": timm_key_map, TF_PORT_LAYOUT: timm_key_map}
_TF_PORT_WHY = ("timm's TF-ported weights (tf_efficientnet_*) need TF 'same' padding and BatchNorm eps 1e-3; "
                "this model pads symmetrically, so they would load but give wrong outputs: build "
                "EfficientNet(version, padding=\"same\") for them")
_SYMMETRIC_WHY = ("this model has TF 'same' padding (padding=\"same\"), for timm's tf_efficientnet_* weights; "
                  "weights trained with symmetric padding (torchvision, timm's efficientnet_*) need "
                  "EfficientNet(version) (padding=\"symmetric\")")


def padding_of(model):
    """'same' or 'symmetric': the padding `model` (an effnet_fast.EfficientNet) was built with."""
    return getattr(model, "padding", "symmetric")


def check_layout_padding(model, layout):
    """Refuse a peer layout whose padding is not `model`'s (the weights would load but give
    wrong outputs): the TF ports need padding="same", everything else symmetric padding."""
    same = padding_of(model) == "same"
    if layout == "effnet_fast":
        return
    if layout == TF_PORT_LAYOUT and not same:
        raise ValueError(f"layout {TF_PORT_LAYOUT!r}: {_TF_PORT_WHY}")
    if layout != TF_PORT_LAYOUT and same:
        hint = f"; for tf_efficientnet_* weights pass layout={TF_PORT_LAYOUT!r}" if layout == "timm" else ""
        raise ValueError(f"layout {layout!r}: {_SYMMETRIC_WHY}{hint}")


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


def _checked_layout(model, state_dict, layout):
    if layout is not None and layout not in ("effnet_fast", *KEY_MAPS):
        raise ValueError(f"unknown layout {layout!r}; choose one of {('effnet_fast', *KEY_MAPS)}")
    detected = detect_layout(state_dict)
    if layout is None and detected == "timm":
        raise ValueError("a timm state dict needs an explicit layout: pass layout='timm' for timm's efficientnet_b* "
                         f"weights or layout={TF_PORT_LAYOUT!r} for its tf_efficientnet_b* (TF 'same' padding, "
                         "into EfficientNet(version, padding=\"same\")), or the timm model itself instead of its "
                         "state dict: its keys cannot tell the two apart")
    layout = layout or detected
    check_layout_padding(model, layout)
    if layout == "effnet_fast" and has_same_padding_marker(state_dict) != (padding_of(model) == "same"):
        raise ValueError(f"weights of ours: {_TF_PORT_WHY}" if padding_of(model) != "same" else
                         f"weights of ours with symmetric padding: {_SYMMETRIC_WHY}")
    if layout == "effnet_fast":
        check_bn_eps(model, state_dict)
    return layout


def check_bn_eps(model, state_dict):
    """Refuse weights of ours saved from a model with another BatchNorm eps (recorded as
    BN_EPS_MARKER when not the variant's default): they would load and answer differently."""
    theirs, ours = bn_eps_marker(state_dict), bn_eps_marker(model.state_dict())
    if theirs is None and ours is None or theirs is not None and ours is not None and \
            abs(theirs - ours) <= 1e-2 * ours:  # a marker cast with the model to a low precision
        return
    eps = batch_norm_eps(model)
    saved = f"BatchNorm eps {theirs:g}" if theirs is not None else "the variant's default BatchNorm eps"
    fix = f"bn_eps={theirs:g}" if theirs is not None else "no bn_eps"
    raise ValueError(f"weights of ours saved from a model with {saved}; this model uses {sorted(eps)}: "
                     f"build it with EfficientNet(..., {fix}) to load them")


def convert_state_dict(model, state_dict, layout=None, strict=True):
    """`state_dict` (in `layout`, detected when None; timm's needs it given, see the
    module docstring) translated to `model`'s keys. Missing keys (e.g.
    num_batches_tracked of older checkpoints) are left out; a shape mismatch raises
    ValueError naming the tensor. strict=False skips missing and unused tensors."""
    layout = _checked_layout(model, state_dict, layout)
    if layout == "effnet_fast":
        return dict(state_dict)
    km = KEY_MAPS[layout](model)
    ours = model.state_dict()
    out = {}
    for our_key, their_key in km.items():
        if their_key not in state_dict:
            if our_key.endswith("num_batches_tracked") or not strict:
                continue
            raise KeyError(f"{layout} state dict has no {their_key!r} (for {our_key!r}); "
                           f"is it a different EfficientNet variant?")
        t = state_dict[their_key]
        if t.shape != ours[our_key].shape:
            raise ValueError(f"{their_key} has shape {tuple(t.shape)} but {our_key} needs "
                             f"{tuple(ours[our_key].shape)}: different variant or num_classes?")
        out[our_key] = t
    out.update({k: v for k, v in ours.items()  # ours only
                if k.rsplit(".", 1)[-1] == SAME_PADDING_MARKER or k == BN_EPS_MARKER})
    unused = set(state_dict) - set(km.values())
    if unused and strict:
        raise ValueError(f"{len(unused)} {layout} tensors have no place in this model, e.g. {sorted(unused)[:3]}")
    return out


def to_layout(model, layout="torchvision"):
    """`model`'s state dict in a peer's layout ('torchvision', 'timm' or 'timm_tf', the
    latter two with the same keys)."""
    ours = model.state_dict()
    return {theirs: ours[our_key] for our_key, theirs in KEY_MAPS[layout](model).items()}


def batch_norm_eps(module):
    """The set of BatchNorm eps values in `module`."""
    return {m.eps for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def peer_layout(model, peer):
    """The layout of a peer model object: 'timm_tf' for a timm TF port (its Conv2dSame
    layers), else the one its state dict's keys show. Refuses (ValueError) a peer with
    another padding than `model` (its BatchNorm eps: check_peer_model, once the weights
    are known to fit)."""
    same_pad = [name for name, m in peer.named_modules() if type(m).__name__.startswith("Conv2dSame")]
    if same_pad and padding_of(model) != "same":
        raise ValueError(f"{type(peer).__name__} has {len(same_pad)} Conv2dSame layers (e.g. {same_pad[0]!r}): "
                         f"it is a TF port; {_TF_PORT_WHY}")
    if not same_pad and padding_of(model) == "same":
        raise ValueError(f"{type(peer).__name__} has no Conv2dSame layers: {_SYMMETRIC_WHY}")
    layout = detect_layout(peer.state_dict())
    return TF_PORT_LAYOUT if same_pad and layout == "timm" else layout


def check_peer_model(model, peer):
    """Refuse a peer model whose BatchNorm eps is not `model`'s (padding: see peer_layout)."""
    theirs, ours = batch_norm_eps(peer), batch_norm_eps(model)
    if theirs != ours:
        raise ValueError(f"{type(peer).__name__} uses BatchNorm eps {sorted(theirs)}, this model {sorted(ours)}: "
                         f"build it with EfficientNet(..., bn_eps={min(theirs)}) to load these weights")


def _read(source):
    """A state dict from a local file or a URL (needs a network); tensors only."""
    source = str(source)
    if source.startswith(("http://", "https://")):
        return torch.hub.load_state_dict_from_url(source, map_location="cpu", check_hash=False, weights_only=True)
    return torch.load(source, map_location="cpu", weights_only=True)


def check_fits(model, state, strict):
    """Raise before anything is copied when `state` cannot load completely, so a
    failed load leaves `model` as it was (load_state_dict copies what fits first)."""
    ours = model.state_dict()
    wrong = [f"{k} {tuple(t.shape)} (needs {tuple(ours[k].shape)})" for k, t in state.items()
             if k in ours and t.shape != ours[k].shape]
    if wrong:
        raise ValueError(f"{len(wrong)} tensors do not fit this model (different variant or num_classes?), e.g. "
                         f"{wrong[:3]}; nothing was loaded")
    if strict:
        missing = sorted(k for k in ours.keys() - state.keys() if not k.endswith("num_batches_tracked"))
        unexpected = sorted(state.keys() - ours.keys())
        if missing or unexpected:
            raise KeyError(f"state dict does not match the model: {len(missing)} missing keys (e.g. {missing[:3]}), "
                           f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]}); nothing was loaded")


def load_weights(model, source, layout=None, strict=True):
    """Load weights into `model` from a state dict, a local file, a URL (needs a
    network) or a torchvision / timm model object, in our, torchvision's or timm's
    layout (a timm state dict needs layout='timm', or 'timm_tf' for the TF ports, which
    load into EfficientNet(version, padding="same") only; see the module docstring). Only
    tensors are unpickled (weights_only=True). All or nothing: a load that fails
    leaves the model unchanged. Returns the model."""
    if isinstance(source, nn.Module):
        detected = peer_layout(model, source)
        state = source.state_dict()
        if layout is None or {layout, detected} <= {"timm", TF_PORT_LAYOUT}:
            layout = detected  # the object shows which of timm's two layouts it is
    elif isinstance(source, (str, os.PathLike)):
        state = _read(source)
    else:
        state = source
    if isinstance(state, dict) and "state_dict" in state and not torch.is_tensor(state["state_dict"]):
        state = state["state_dict"]  # a training checkpoint
    state = convert_state_dict(model, state, layout, strict)
    if isinstance(source, nn.Module):
        check_peer_model(model, source)  # after the variant check: eps is the last thing to differ
    check_fits(model, state, strict)
    model.load_state_dict(state, strict=strict)
    return model
