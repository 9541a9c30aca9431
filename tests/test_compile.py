"""The fused layers under torch.compile(fullgraph=True): forward and backward match eager."""
import pytest
import torch

from backend_cases import backend_params
from effnet_fast.layers import FusedDWConvBNSiLU, FusedSqueezeExcitation


class Block(torch.nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.dw = FusedDWConvBNSiLU(8, 3, 2, backend=backend)
        self.se = FusedSqueezeExcitation(8, 2, backend=backend)

    def forward(self, x):
        return self.se(self.dw(x))


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
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(grad_c, grad_e)
    for (name, p_e), p_c in zip(eager.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(p_c.grad, p_e.grad, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(compiled_model.dw.bn.running_mean, eager.dw.bn.running_mean)
