"""The fused layers under torch.compile(fullgraph=True): forward and backward match eager."""
import pytest
import torch

from backend_cases import backend_params
from effnet_fast.nn import MBConv
from effnet_fast import set_fused


def Block(backend):
    """An MBConv block with every fused op: 1x1 BN+SiLU, depthwise, SE + projection."""
    return set_fused(MBConv(8, 8, 4, 3, 1, drop_prob=0.0), backend)


def run(model, x):
    x = x.clone().requires_grad_()
    out = model(x)
    out.square().sum().backward()
    return out, x.grad


@pytest.mark.parametrize("compiler", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
@pytest.mark.parametrize("backend,device", [p for p in backend_params() if p.values[0] in ("reference", "cpu", "cuda")])
def test_fullgraph_compile_matches_eager(backend, device, compiler):
    torch.manual_seed(0)
    torch._dynamo.reset()
    eager = Block(backend).to(device).train()
    compiled_model = Block(backend).to(device).train()
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, fullgraph=True, backend=compiler)
    x = torch.randn(2, 8, 9, 9, device=device)
    out_e, grad_e = run(eager, x)
    out_c, grad_c = run(compiled, x)
    torch.testing.assert_close(out_c, out_e, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_c, grad_e, atol=1e-5, rtol=1e-5)
    for (name, p_e), p_c in zip(eager.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(p_c.grad, p_e.grad, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    for (name, b_e), b_c in zip(eager.named_buffers(), compiled_model.buffers()):
        torch.testing.assert_close(b_c, b_e, msg=lambda m: f"{name}: {m}")
