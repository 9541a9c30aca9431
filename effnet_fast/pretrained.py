"""Pretrained weights in one line, from the sources users already have:

    EfficientNet.from_pretrained("torchvision:efficientnet_b0.IMAGENET1K_V1")
    EfficientNet.from_pretrained("timm:tf_efficientnet_b7.ns_jft_in1k")

torchvision's weights come through its weights API (the URL and preprocessing of a
`torchvision.models.get_model_weights(...)` entry), timm's from the Hugging Face hub
repository its pretrained config names, in safetensors; both are cached by those
libraries. The peer model is built without weights, the weights are read as tensors
only (`torch.load(weights_only=True)` or safetensors: no file read runs code), loaded
into it, and converted into ours (effnet_fast.convert.load_weights), so the variant,
TF 'same' padding and BatchNorm eps come from the peer model itself. `file=` reads the
weights from a local file instead of downloading them.

The model keeps the source's preprocessing in `model.pretrained`: name, input size,
crop fraction, mean, std, interpolation and class names (what predict needs).
"""
import re

import torch

from .convert import batch_norm_eps, load_weights

SOURCES = ("torchvision", "timm")
# Architectures with a stage table here (the matching group is our version): EfficientNet
# B0-B7 and EfficientNetV2 S/M/L (timm: also efficientnetv2_rw_s), symmetric or TF padding.
_TORCHVISION_ARCH = re.compile(r"efficientnet_(b[0-7]|v2_[sml])")
_TIMM_ARCH = re.compile(r"(?:tf_)?efficientnet_(b[0-7])|(?:tf_)?efficientnet(v2_[sml])|efficientnet(v2_rw_s)")


def is_pretrained_name(name):
    """True for a "source:model" name (a local file of that name takes precedence)."""
    return isinstance(name, str) and name.split(":", 1)[0] in SOURCES and ":" in name


def from_pretrained(model_class, name, fused=False, file=None):
    """A `model_class` (effnet_fast.EfficientNet; this module does not import it, as the
    class method calls here) with the weights `name` names,
    "torchvision:<arch>[.<weights>]" (default: the architecture's DEFAULT weights) or
    "timm:<arch>[.<tag>]".

    fused: as EfficientNet(fused=...). file: read the weights from this local file
    (a state dict of the source's model) instead of downloading them.
    Raises ValueError naming the problem: an unknown source or architecture, weights
    torchvision does not list, an EfficientNet variant that is not built here."""
    source, _, model_name = name.partition(":") if isinstance(name, str) else ("", "", "")
    if source not in SOURCES or not model_name:
        raise ValueError(f"pretrained name {name!r}: expected '<source>:<model>' with source one of {SOURCES}, "
                         "e.g. 'torchvision:efficientnet_b0.IMAGENET1K_V1' or 'timm:tf_efficientnet_b0.ns_jft_in1k'")
    peer, preprocessing = (_torchvision if source == "torchvision" else _timm)(model_name, file)
    version = _version_of(source, model_name)
    padding = "same" if source == "timm" and model_name.startswith("tf_") else "symmetric"
    model = model_class(version, num_classes=len(preprocessing["classes"]), padding=padding, fused=fused,
                        bn_eps=_single_eps(peer))
    load_weights(model, peer)
    model.pretrained = {"name": name, **preprocessing}
    return model.eval()


def _version_of(source, model_name):
    arch = model_name.split(".", 1)[0]
    match = (_TORCHVISION_ARCH if source == "torchvision" else _TIMM_ARCH).fullmatch(arch)
    if match is None:
        raise ValueError(f"{source}:{model_name}: {arch} is not an EfficientNet B0-B7 or EfficientNetV2 S/M/L "
                         "(symmetric or TF 'same' padding; timm's efficientnetv2_rw_s too); other families are not "
                         "built here")
    return match.group(match.lastindex)


def _single_eps(peer):
    """The peer's BatchNorm eps (timm's efficientnetv2_* use 1e-5 where torchvision's V2 and
    the TF ports use 1e-3): ours is built with it, so the weights compute the same."""
    eps = batch_norm_eps(peer)
    if len(eps) != 1:
        raise ValueError(f"the source model mixes BatchNorm eps {sorted(eps)}; it is not an EfficientNet built here")
    return eps.pop()


def _read_state_dict(file):
    """Tensors only: safetensors, or torch.load with weights_only=True."""
    file = str(file)
    if file.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(file)
    state = torch.load(file, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def _torchvision(model_name, file):
    import torchvision
    arch, _, tag = model_name.partition(".")
    _version_of("torchvision", model_name)
    entries = torchvision.models.get_model_weights(arch)
    try:
        weights = entries[tag or "DEFAULT"]
    except KeyError:
        raise ValueError(f"torchvision:{model_name}: torchvision lists {', '.join(entries.__members__)} for "
                         f"{arch}") from None
    classes = list(weights.meta["categories"])
    peer = torchvision.models.get_model(arch, weights=None, num_classes=len(classes))
    state = _read_state_dict(file) if file else torch.hub.load_state_dict_from_url(
        weights.url, map_location="cpu", check_hash=True, weights_only=True)
    peer.load_state_dict(state)
    t = weights.transforms()
    return peer, {"size": t.crop_size[0], "crop_fraction": t.crop_size[0] / t.resize_size[0],
                  "mean": tuple(t.mean), "std": tuple(t.std), "interpolation": t.interpolation.value,
                  "classes": classes}


def _timm(model_name, file):
    import timm
    _version_of("timm", model_name)
    peer = timm.create_model(model_name, pretrained=False)
    if file:
        state = _read_state_dict(file)
    else:
        from huggingface_hub import hf_hub_download
        repo = peer.pretrained_cfg.get("hf_hub_id")
        if not repo:
            raise ValueError(f"timm:{model_name}: timm names no Hugging Face hub repository for these weights; "
                             "download them yourself and pass file=")
        state = _read_state_dict(hf_hub_download(repo, "model.safetensors"))
    peer.load_state_dict(state)
    cfg = timm.data.resolve_data_config({}, model=peer)
    classes = [str(i) for i in range(peer.num_classes)]
    if peer.num_classes == 1000:
        classes = list(timm.data.ImageNetInfo().label_descriptions())
    return peer, {"size": cfg["input_size"][-1], "crop_fraction": cfg["crop_pct"], "mean": tuple(cfg["mean"]),
                  "std": tuple(cfg["std"]), "interpolation": cfg["interpolation"], "classes": classes}
