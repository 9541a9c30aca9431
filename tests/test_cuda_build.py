"""The CUDA backend is built and registered for every op, and the emulated build
(effnet_fast._C_emu, the same kernels and launch code on the host) matches it."""
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from effnet_fast.ops.backends import _import_errors, cuda_emu_built

ROOT = Path(__file__).resolve().parents[1]


def declared_ops(path="csrc/op_schemas.h"):
    """Op names of the m.def(...) schemas in a registration file."""
    return re.findall(r'm\.def\(\s*"(\w+)\(', (ROOT / path).read_text())


def why_cuda_not_expected():
    if os.environ.get("EFFNET_FAST_BUILD_CUDA") == "0":
        return "EFFNET_FAST_BUILD_CUDA=0: the CUDA part is not built"
    if shutil.which("nvcc") is None and not os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "no nvcc on PATH or in /usr/local/cuda/bin: the CUDA part cannot be built"
    return None


def test_eleven_ops_are_declared():
    assert len(declared_ops()) == 11, declared_ops()


@pytest.mark.skipif(why_cuda_not_expected() is not None, reason=str(why_cuda_not_expected()))
def test_every_op_has_a_cuda_kernel():
    try:
        import effnet_fast._C  # noqa: F401
    except Exception as exc:  # a missing or broken build fails here, with the reason
        pytest.fail(f"effnet_fast._C does not import: {type(exc).__name__}: {exc}")
    missing = [op for op in declared_ops()
               if not torch._C._dispatch_has_kernel_for_dispatch_key(f"effnet_fast::{op}", "CUDA")]
    assert not missing, (f"no CUDA kernel registered for {missing}: effnet_fast._C was built without its CUDA "
                         "part; rebuild with EFFNET_FAST_BUILD_CUDA=1 pip install -e . --no-build-isolation")


needs_emu = pytest.mark.skipif(not cuda_emu_built(), reason=f"effnet_fast._C_emu is not built "
                               f"({_import_errors.get('effnet_fast._C_emu', 'no CPU kernels registered')})")


@needs_emu
def test_emulated_ops_have_the_same_schemas():
    import effnet_fast._C  # noqa: F401  (the reference schemas)
    for op in declared_ops():
        ours = str(getattr(torch.ops.effnet_fast_emu, op).default._schema)
        want = str(getattr(torch.ops.effnet_fast, op).default._schema)
        assert ours.replace("effnet_fast_emu::", "effnet_fast::") == want


@needs_emu
def test_emulated_ops_reject_bad_inputs_clearly():
    k = torch.ops.effnet_fast_emu
    x, w, v = torch.randn(1, 4, 5, 5), torch.randn(4, 1, 3, 3), torch.randn(4)
    cases = [
        (lambda: k.dwconv_bn_silu_stats(x[0], w, 1), "expected x of shape"),
        (lambda: k.dwconv_bn_silu_stats(x, torch.randn(4, 1, 7, 7), 1), "unsupported kernel size 7"),
        (lambda: k.dwconv_bn_silu_stats(x, torch.randn(3, 1, 3, 3), 1), "x has 4 channels"),
        (lambda: k.dwconv_bn_silu_stats(x, w, 3), "unsupported stride 3"),
        (lambda: k.dwconv_bn_silu_stats(x, w.double(), 1), "weight dtype"),
        (lambda: k.dwconv_bn_silu_stats(x.int(), w.int(), 1), "unsupported dtype"),
        (lambda: k.dwconv_bn_silu_forward(x, w, v[:3], v, 1), "scale must have shape"),
        (lambda: k.dwconv_bn_silu_backward_reduce(torch.randn(1, 4, 4, 4), x, w, v, v, v, 1), "grad_out has shape"),
        (lambda: k.se_scale(x, torch.rand(1, 3), None), "gate must have shape"),
        (lambda: k.se_gate_grad(torch.randn(1, 4, 5, 4), x), "grad_out has shape"),
        (lambda: k.se_pool(torch.randn(0, 4, 5, 5)), "x is empty"),
        (lambda: k.bn_silu_stats(x[0]), "expected y of shape"),
        (lambda: k.bn_silu_stats(torch.randn(0, 4, 5, 5)), "y is empty"),
        (lambda: k.bn_silu_stats(x.int()), "unsupported dtype"),
        (lambda: k.bn_silu_forward(x, v[:3], v), "scale must have shape"),
        (lambda: k.bn_silu_backward_reduce(torch.randn(1, 4, 4, 4), x, v, v, v), "grad_out has shape"),
        (lambda: k.bn_silu_backward(x.double(), x, v, v, v, v, v), "grad_out dtype"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()


@needs_emu
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_emulated_stats_survive_a_large_offset(channels_last):
    """Per-channel variance of values around 1e4 (float32): no catastrophic cancellation."""
    torch.manual_seed(5)
    x = torch.randn(2, 3, 40, 40) + 1e4
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = torch.zeros(3, 1, 3, 3)
    w[:, :, 1, 1] = 1.0  # identity filter: y = x
    want_var, want_mean = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
    emu = torch.ops.effnet_fast_emu
    for mean, var in (emu.dwconv_bn_silu_stats(x, w, 1), emu.bn_silu_stats(x)):
        torch.testing.assert_close(mean.double(), want_mean, rtol=1e-6, atol=0)
        torch.testing.assert_close(var.double(), want_var, rtol=1e-3, atol=0)


@needs_emu
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_emulated_kernels_split_planes_over_chunks(channels_last):
    """Shapes large enough that reductions merge partials from several blocks
    (and the SE sums add them atomically), against the reference kernels."""
    from effnet_fast.ops import kernels
    torch.manual_seed(6)
    ref, emu = kernels("reference"), torch.ops.effnet_fast_emu
    x = torch.randn(2, 2, 36, 34)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(2, 1, 3, 3)
    scale, shift, mean, ca, cb, cc = (torch.randn(2) for _ in range(6))
    g = torch.randn_like(ref.dwconv_bn_silu_forward(x, w, scale, shift, 1))
    checks = [
        (emu.dwconv_bn_silu_stats(x, w, 1), ref.dwconv_bn_silu_stats(x, w, 1)),
        (emu.dwconv_bn_silu_backward_reduce(g, x, w, scale, shift, mean, 1),
         ref.dwconv_bn_silu_backward_reduce(g, x, w, scale, shift, mean, 1)),
        (emu.dwconv_bn_silu_backward(g, x, w, scale, shift, ca, cb, cc, 1),
         ref.dwconv_bn_silu_backward(g, x, w, scale, shift, ca, cb, cc, 1)),
        ((emu.se_pool(x), emu.se_gate_grad(g, x)), (ref.se_pool(x), ref.se_gate_grad(g, x))),
        (emu.bn_silu_stats(x), ref.bn_silu_stats(x)),
        (emu.bn_silu_backward_reduce(x, x, scale, shift, mean), ref.bn_silu_backward_reduce(x, x, scale, shift, mean)),
    ]
    for got, want in checks:
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-3)


def test_emulator_runs_good_kernels_and_reports_broken_ones(tmp_path):
    """csrc/emu/selftest: shared-memory and warp reductions, atomicAdd, and the
    errors for a missing or divergent barrier, a bad shuffle mask, a shared-memory
    overflow and invalid launches."""
    import subprocess
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler (g++ or c++) on PATH")
    exe = tmp_path / "emu_selftest"
    subprocess.run([cxx, "-std=c++20", "-O1", "-I", str(ROOT / "csrc/emu"),
                    str(ROOT / "csrc/emu/selftest/emu_selftest.cpp"), str(ROOT / "csrc/emu/cuda_emu.cpp"),
                    "-o", str(exe)], check=True, capture_output=True, text=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
