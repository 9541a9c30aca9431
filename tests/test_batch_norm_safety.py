"""nn.BatchNorm2d's training checks hold in the fused layers, and a refused call
leaves the running statistics untouched (defect 4)."""
import pytest
import torch

from backend_cases import backend_params
from safety_cases import CHANNELS, assert_bitwise_unchanged, fused_layer, snapshot


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("kind", ["dw", "conv"])
def test_one_value_per_channel_in_training_is_refused(backend, device, kind):
    layer = fused_layer(kind, backend).to(device).train()
    before = snapshot(layer)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        layer(torch.randn(1, CHANNELS, 1, 1, device=device))
    assert_bitwise_unchanged(layer, before)
    assert torch.isfinite(layer.bn.running_var).all()


@pytest.mark.parametrize("backend,device", backend_params())
def test_stride_2_to_one_output_value_per_channel_is_refused(backend, device):
    """The count is of the conv's output, as the reference's BatchNorm sees it."""
    layer = fused_layer("dw", backend, stride=2).to(device).train()
    before = snapshot(layer)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.randn(1, CHANNELS, 2, 2, device=device))
    assert_bitwise_unchanged(layer, before)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("kind", ["dw", "conv"])
def test_zero_eps_in_training_is_refused(backend, device, kind):
    layer = fused_layer(kind, backend).to(device).train()
    layer.bn.eps = 0.0
    before = snapshot(layer)
    with pytest.raises(ValueError, match="eps must be positive"):
        layer(torch.randn(2, CHANNELS, 3, 3, device=device))
    assert_bitwise_unchanged(layer, before)


@pytest.mark.parametrize("kind", ["dw", "conv"])
def test_one_value_per_channel_in_eval_is_fine(kind):
    layer = fused_layer(kind, "cpu").eval()
    assert torch.isfinite(layer(torch.randn(1, CHANNELS, 1, 1))).all()
