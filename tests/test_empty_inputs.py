"""An empty batch or plane goes through every fused layer as through the reference,
forward and backward, in training and eval: no crash, no rejection (defect 3)."""
import pytest
import torch

from backend_cases import backend_params
from safety_cases import CHANNELS, fused_layer, reference_of


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("kind", ["dw", "se", "conv"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(0, CHANNELS, 5, 5), (2, CHANNELS, 0, 5), (2, CHANNELS, 5, 0)],
                         ids=["n0", "h0", "w0"])
def test_empty_input_handled_as_reference(backend, device, kind, train, shape):
    layer = fused_layer(kind, backend).to(device).train(train)
    ref = reference_of(layer).train(train)
    outs, grads = [], []
    for module in (ref, layer):
        x = torch.randn(shape, device=device, requires_grad=True)
        try:
            out = module(x)
        except RuntimeError as exc:  # the reference's conv refuses an empty plane
            assert module is ref, f"fused layer raised where the reference did not: {exc}"
            with pytest.raises(type(exc), match="Kernel size can't be greater"):
                layer(x)
            return
        out.sum().backward()
        outs.append(out)
        grads.append(x.grad)
    assert outs[1].shape == outs[0].shape and outs[1].dtype == outs[0].dtype
    assert grads[1].shape == grads[0].shape
    for (name, b_ref), b in zip(ref.named_buffers(), layer.buffers()):
        torch.testing.assert_close(b, b_ref, equal_nan=True, msg=lambda m: f"{name}: {m}")


def test_empty_batch_eval_backward_of_fused_1x1_conv_bn_silu_does_not_kill_the_process():
    """The crash itself (SIGFPE in the eval-mode backward of BN + SiLU on N = 0),
    run in a child process so that a regression fails the test instead of the run."""
    import subprocess
    import sys
    code = ("import torch; from effnet_fast.nn import FusedConvBNAct; "
            "m = FusedConvBNAct(4, 4, 1).eval(); x = torch.randn(0, 4, 5, 5, requires_grad=True); "
            "m(x).sum().backward(); print(tuple(x.grad.shape))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "(0, 4, 5, 5)" in result.stdout
