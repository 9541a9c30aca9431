"""Backends, dtypes and tolerances shared by the op tests."""
import pytest
import torch

from effnet_fast.ops.backends import REGISTRY, _why_unusable
from effnet_fast.ops.common import acc_dtype

# (dtype, atol, rtol) against the reference computed in float32/64 on the same
# (rounded) inputs.
TOLERANCES = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (2e-4, 2e-4),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (6e-2, 6e-2),
}

# dtypes each backend claims (the registry's), all run in the tests.
BACKEND_DTYPES = {name: b.dtypes for name, b in REGISTRY.items()}
# Backends that run float64 and so take torch.autograd.gradcheck.
GRADCHECK_BACKENDS = tuple(name for name, b in REGISTRY.items() if b.gradcheck)
# (backend, device) pairs to test: each backend on its devices, and Triton on CPU
# tensors through the interpreter.
BACKEND_DEVICES = [(name, kind) for name, b in REGISTRY.items() for kind in b.device_types] + [("triton", "cpu")]


def backend_params(with_dtypes=False):
    """(backend, device) pairs, or (backend, device, dtype) triples: every backend that
    runs on CPU tensors here, and the GPU backends on a CUDA device when there is
    one; each skips saying why."""
    params = []
    for backend, device in BACKEND_DEVICES:
        if device == "cuda" and not torch.cuda.is_available():
            why = "no CUDA device"
        else:
            why = _why_unusable(backend, torch.device(device))
        marks = [pytest.mark.skipif(why is not None, reason=str(why))]
        if device == "cuda":
            marks.append(pytest.mark.cuda)
        if with_dtypes:
            params += [pytest.param(backend, device, dtype, marks=marks,
                                    id=f"{backend}-{device}-{str(dtype)[6:]}") for dtype in BACKEND_DTYPES[backend]]
        else:
            params.append(pytest.param(backend, device, marks=marks, id=f"{backend}-{device}"))
    return params


def assert_close(actual, expected, dtype, name, scale=1.0):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.to(expected.dtype), expected, atol=atol * scale, rtol=rtol * scale,
                               msg=lambda m: f"{name}: {m}")


def forward_backward_pair(ref_fn, fused_fn, x, dtype):
    """Run the reference on x in the accumulation dtype and the fused path on x, both
    backward with the same random output gradient; returns (x_ref, x_fused, out_ref, out)
    with the input gradients in x_ref.grad and x_fused.grad."""
    x_ref = x.detach().to(acc_dtype(dtype)).requires_grad_()
    x_fused = x.detach().clone().requires_grad_()
    out_ref, out = ref_fn(x_ref), fused_fn(x_fused)
    grad = torch.randn_like(out_ref)
    out_ref.backward(grad)
    out.backward(grad.to(dtype))
    return x_ref, x_fused, out_ref, out
