"""A table of bad inputs and module settings for every fused layer, on every backend
that runs here: each raises the expected exception with a message naming the
problem, and leaves every parameter and buffer bitwise unchanged."""
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from backend_cases import backend_params
from safety_cases import CHANNELS, assert_bitwise_unchanged, fused_layer, snapshot

C = CHANNELS


@dataclass
class BadCase:
    name: str
    kind: str             # 'dw', 'se' or 'conv' (see safety_cases.fused_layer)
    shape: tuple
    exception: type
    phrase: str
    dtype: torch.dtype = torch.float32
    train: bool = True
    setup: callable = field(default=lambda layer: None)


def _set(path, value):
    def setup(layer):
        *parents, attr = path.split(".")
        target = layer
        for p in parents:
            target = getattr(target, p)
        setattr(target, attr, value)
    return setup


def _weight_on_meta(layer):
    layer.conv.weight = nn.Parameter(torch.empty_like(layer.conv.weight, device="meta"))


def _fc_in_float64(layer):
    layer.fc1.double()


CASES = [
    BadCase("dw-3d-input", "dw", (C, 5, 5), ValueError, "4-D"),
    BadCase("dw-channels", "dw", (2, C + 1, 5, 5), ValueError, f"input has {C + 1} channels"),
    BadCase("dw-dtype-mismatch", "dw", (2, C, 5, 5), TypeError, "dtype", dtype=torch.float64),
    BadCase("dw-integer-input", "dw", (2, C, 5, 5), TypeError, "dtype", dtype=torch.int32),
    BadCase("dw-kernel-7", "dw", (2, C, 9, 9), ValueError, "kernel size 7",
            setup=_set("conv.weight", nn.Parameter(torch.randn(C, 1, 7, 7)))),
    BadCase("dw-one-value-per-channel", "dw", (1, C, 1, 1), ValueError, "more than 1 value per channel"),
    BadCase("dw-eps-0", "dw", (2, C, 5, 5), ValueError, "eps must be positive", setup=_set("bn.eps", 0.0)),
    BadCase("dw-padding-changed", "dw", (2, C, 5, 5), ValueError, "padding", setup=_set("conv.padding", (0, 0))),
    BadCase("dw-dilation-changed", "dw", (2, C, 5, 5), ValueError, "dilation", setup=_set("conv.dilation", (2, 2))),
    BadCase("dw-weight-on-meta", "dw", (2, C, 5, 5), ValueError, "meta", setup=_weight_on_meta),
    BadCase("dw-unknown-backend", "dw", (2, C, 5, 5), ValueError, "fused must be", setup=_set("backend", "metal")),
    BadCase("se-3d-input", "se", (C, 5, 5), ValueError, "4-D"),
    BadCase("se-channels", "se", (2, C + 1, 5, 5), ValueError, "fc1 weight must be"),
    BadCase("se-integer-input", "se", (2, C, 5, 5), TypeError, "dtype", dtype=torch.int32),
    BadCase("se-weight-dtype", "se", (2, C, 5, 5), TypeError, "fc1 weight dtype torch.float64", setup=_fc_in_float64),
    BadCase("se-fc-padding-changed", "se", (2, C, 5, 5), ValueError, "padding", setup=_set("fc1.padding", (1, 1))),
    BadCase("conv-one-value-per-channel", "conv", (1, C, 1, 1), ValueError, "more than 1 value per channel"),
    BadCase("conv-eps-0", "conv", (2, C, 5, 5), ValueError, "eps must be positive", setup=_set("bn.eps", 0.0)),
    BadCase("conv-unbatched-input", "conv", (C, 5, 5), ValueError, "4-D"),
]


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_raises_and_leaves_state_unchanged(backend, device, case):
    torch.manual_seed(0)
    layer = fused_layer(case.kind, backend).to(device).train(case.train)
    case.setup(layer)
    x = torch.randn(case.shape, device=device).to(case.dtype)
    before = snapshot(layer)
    with pytest.raises(case.exception, match=case.phrase):
        layer(x)
    assert_bitwise_unchanged(layer, before)
