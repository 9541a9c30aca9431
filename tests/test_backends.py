"""Backend selection: what fused=True picks, and the errors of a backend that cannot run."""
import pytest
import torch

import effnet_fast
from effnet_fast.ops import backends
from effnet_fast.ops.backends import resolve_backend


def test_build_info_lists_every_backend():
    info = effnet_fast.build_info()
    assert set(effnet_fast.BACKENDS) <= info["kernels_built"].keys()
    assert all(isinstance(v, bool) for v in info["kernels_built"].values())
    assert info["cuda_device_available"] == torch.cuda.is_available()
    assert info["fused_true_picks"]["cpu"] == ("cpu" if backends.cpu_built() else None)
    if not torch.cuda.is_available():
        assert info["fused_true_picks"]["cuda"] is None


def test_registry_drives_the_fused_setting_and_kernel_tables():
    for name, b in backends.REGISTRY.items():
        effnet_fast.EfficientNet("b0", num_classes=2, fused=False).set_fused(name)  # accepted by name
        assert (name in effnet_fast.BACKENDS) == (not b.tests_only)
        if b.built():
            assert hasattr(backends.kernels(name), "se_pool")
    with pytest.raises(ValueError, match="fused must be False, True, 'auto' or one of"):
        effnet_fast.EfficientNet("b0", fused="gpu")


def test_fused_true_on_cpu_picks_the_cpu_kernels():
    if not backends.cpu_built():
        pytest.skip("the C++ extension is not built")
    assert resolve_backend(True, "cpu") == "cpu"


def test_missing_extension_is_explained(monkeypatch):
    monkeypatch.setattr(backends, "_C", None)
    with pytest.raises(RuntimeError, match="pip install -e"):
        resolve_backend("cpu", "cpu")
    with pytest.raises(RuntimeError, match="no fused backend can run on cpu"):
        resolve_backend(True, "cpu")
    # the reference model still works
    model = effnet_fast.EfficientNet("b0", num_classes=3).eval()
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_wrong_device_is_explained():
    if backends.cuda_built():
        with pytest.raises(RuntimeError, match="runs on cuda tensors, got a cpu tensor"):
            resolve_backend("cuda", "cpu")
    else:
        with pytest.raises(RuntimeError, match="without its CUDA kernels"):
            resolve_backend("cuda", "cpu")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if backends.triton_built():
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            resolve_backend("triton", "cpu")


def test_unknown_backend():
    with pytest.raises(ValueError, match="fused must be"):
        resolve_backend("opencl", "cpu")


def test_forced_backend_fails_at_forward_with_the_reason():
    model = effnet_fast.EfficientNet("b0", num_classes=3, fused="cuda").eval()
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(RuntimeError, match="fused='cuda' cannot run"):
        model(torch.randn(1, 3, 32, 32))
