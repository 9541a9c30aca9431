"""Helpers shared by the reliability tests: small fused layers per backend and a
bitwise snapshot of a module's state."""
import copy

import torch

from effnet_fast.nn import FusedConvBNAct, FusedDWConvBNSiLU, FusedSqueezeExcitation
from effnet_fast.efficientnet import _REFERENCE, _swap

CHANNELS = 4


def fused_layer(kind, backend, **kwargs):
    """A small fused layer of `kind` ('dw', 'se' or 'conv') on `backend`."""
    if kind == "dw":
        return FusedDWConvBNSiLU(CHANNELS, kwargs.get("k", 3), kwargs.get("stride", 1), backend=backend)
    if kind == "se":
        return FusedSqueezeExcitation(CHANNELS, 2, backend=backend)
    return FusedConvBNAct(CHANNELS, CHANNELS, 1, backend=backend)


def reference_of(layer):
    """A reference layer with a copy of `layer`'s parameters and buffers."""
    return _swap(copy.deepcopy(layer), _REFERENCE[type(layer)], False)


def snapshot(module):
    """Bitwise copies of every parameter and buffer."""
    return {name: t.detach().clone() for name, t in list(module.named_parameters()) + list(module.named_buffers())}


def assert_bitwise_unchanged(module, before):
    after = snapshot(module)
    assert after.keys() == before.keys()
    for name, t in after.items():
        old = before[name]
        if t.is_meta:  # no data to compare
            continue
        same = t.shape == old.shape and t.dtype == old.dtype and torch.equal(
            t.reshape(-1).view(torch.uint8), old.reshape(-1).view(torch.uint8))
        assert same, f"{name} changed by a failed call: {old} -> {t}"
