"""Double backward through a fused layer is refused with an error naming the layer
and the way to get it, never a silently wrong second derivative (defect 2)."""
import warnings

import pytest
import torch

from backend_cases import backend_params
from effnet_fast import EfficientNet
from safety_cases import CHANNELS, fused_layer


def run_double_backward(layer, x):
    out = layer(x)
    (grad_x,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    grad_x.square().sum().backward()


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("kind,name", [("dw", "FusedDWConvBNSiLU"), ("se", "FusedSqueezeExcitation"),
                                       ("conv", "FusedConvBNAct")])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_double_backward_refused_naming_the_layer(backend, device, kind, name, train):
    layer = fused_layer(kind, backend).to(device).train(train)
    x = torch.randn(2, CHANNELS, 5, 5, device=device, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning instead of the error is the defect
        with pytest.raises(RuntimeError, match=f"{name}.*double backward.*set_fused\\(False\\)"):
            run_double_backward(layer, x)


def test_double_backward_refused_in_the_fused_model():
    model = EfficientNet("b0", num_classes=10, fused="cpu")
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    with pytest.raises(RuntimeError, match="Fused.*double backward.*set_fused\\(False\\)"):
        run_double_backward(model, x)


def test_reference_model_gives_double_backward():
    """What the error points to works: the same model with set_fused(False)."""
    model = EfficientNet("b0", num_classes=10, fused="cpu").set_fused(False)
    run_double_backward(model, torch.randn(2, 3, 32, 32, requires_grad=True))


def test_single_backward_still_works_under_create_graph_free_grad():
    layer = fused_layer("dw", "cpu")
    x = torch.randn(2, CHANNELS, 5, 5, requires_grad=True)
    (grad_x,) = torch.autograd.grad(layer(x).sum(), x)
    assert grad_x.shape == x.shape
