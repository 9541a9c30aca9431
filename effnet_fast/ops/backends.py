"""Which fused backends are built and usable, and the kernel table of each.

A backend's kernel table offers the kernel-level ops declared in csrc/op_schemas.h
(dwconv_bn_silu_stats, ..., se_gate_grad) as attributes:
  reference  plain torch (effnet_fast.ops.reference_kernels), any device
  cpu        C++ kernels, CPU tensors          torch.ops.effnet_fast
  cuda       CUDA C++ kernels, CUDA tensors    torch.ops.effnet_fast
  triton     Triton kernels, CUDA tensors      effnet_fast.kernels
             (CPU tensors too under TRITON_INTERPRET=1)
  cuda_emu   the CUDA kernel sources compiled for the host (tests only)
"""
import importlib
import os

import torch

from .kernel_fakes import register_kernel_fakes

BACKENDS = ("cpu", "cuda", "triton")
# Order in which fused=True tries the backends on a CUDA device.
CUDA_PREFERENCE = ("triton", "cuda")

_import_errors = {}


def _try_import(module):
    try:
        return importlib.import_module(module)
    except Exception as exc:  # ImportError, or a broken build (OSError, undefined symbol)
        _import_errors[module] = f"{type(exc).__name__}: {exc}"
        return None


def _load_extension(module, namespace):
    """Import a compiled extension and give its kernel ops their fake implementations."""
    ext = _try_import(module)
    if ext is not None:
        register_kernel_fakes(namespace)
    return ext


_C = _load_extension("effnet_fast._C", "effnet_fast")


def _has_kernel(dispatch_key, namespace="effnet_fast"):
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"{namespace}::se_pool", dispatch_key)
    except RuntimeError:  # op not registered at all
        return False


def cpu_built():
    return _C is not None and _has_kernel("CPU")


def cuda_built():
    return _C is not None and _has_kernel("CUDA")


def cuda_emu_built():
    return _load_extension("effnet_fast._C_emu", "effnet_fast_emu") is not None and _has_kernel("CPU", "effnet_fast_emu")


def triton_built():
    return _try_import("triton") is not None


def triton_interpreted():
    return os.environ.get("TRITON_INTERPRET") == "1"


def build_info():
    """What this install can run: {backend: bool, ...} plus versions and import errors."""
    return {
        "cpu": cpu_built(),
        "cuda": cuda_built(),
        "triton": triton_built(),
        "cuda_emu": cuda_emu_built(),
        "cuda_device": torch.cuda.is_available(),
        "triton_interpret": triton_interpreted(),
        "torch": torch.__version__,
        "import_errors": dict(_import_errors),
    }


_BUILD_HINT = ("Build it with `pip install -e .` (needs a C++ compiler; the CUDA part also needs "
               "nvcc and a CUDA build of torch, or EFFNET_FAST_BUILD_CUDA=1).")


def _why_unusable(backend, device):
    """None when `backend` can run on tensors of `device`, else the reason."""
    kind = device.type
    if backend == "reference":
        return None
    if backend == "cpu":
        if not cpu_built():
            err = _import_errors.get("effnet_fast._C", "no CPU kernels registered")
            return f"the C++ extension effnet_fast._C is not built ({err}). {_BUILD_HINT}"
        return None if kind == "cpu" else f"backend 'cpu' runs on CPU tensors, got a {kind} tensor"
    if backend == "cuda":
        if not cuda_built():
            return ("effnet_fast._C was built without its CUDA kernels. " + _BUILD_HINT)
        return None if kind == "cuda" else f"backend 'cuda' runs on CUDA tensors, got a {kind} tensor"
    if backend == "triton":
        if not triton_built():
            return f"Triton is not installed ({_import_errors.get('triton')}); `pip install triton`"
        if kind == "cuda" or (kind == "cpu" and triton_interpreted()):
            return None
        return (f"backend 'triton' runs on CUDA tensors (or on CPU tensors with TRITON_INTERPRET=1), "
                f"got a {kind} tensor")
    if backend == "cuda_emu":
        if not cuda_emu_built():
            return f"effnet_fast._C_emu is not built. {_BUILD_HINT}"
        return None if kind == "cpu" else f"backend 'cuda_emu' runs on CPU tensors, got a {kind} tensor"
    return f"unknown backend {backend!r}; choose one of {BACKENDS + ('reference', 'cuda_emu')}"


# Evaluated once when torch.compile traces a layer: the answer depends on the build
# and the device, not on tensor values.
@torch.compiler.assume_constant_result
def resolve_backend(fused, device):
    """The backend name that `fused` (True, 'auto' or a name) means for tensors on `device`.

    Raises RuntimeError (or ValueError for an unknown name) saying why when it cannot run.
    Every fused layer asks on every call, so an answer is remembered for what it depends on:
    the setting, the device type, the interpreter switch and whether the extension loaded."""
    device = torch.device(device)
    key = (fused, device.type, triton_interpreted(), _C is not None)
    if key not in _resolved:
        _resolved[key] = _resolve(fused, device)
    return _resolved[key]


_resolved = {}


def _resolve(fused, device):
    if fused is True or fused == "auto":
        candidates = ("cpu",) if device.type == "cpu" else CUDA_PREFERENCE
        reasons = []
        for name in candidates:
            why = _why_unusable(name, device)
            if why is None:
                return name
            reasons.append(f"{name}: {why}")
        raise RuntimeError(f"fused=True: no fused backend can run on {device.type} tensors ("
                           + "; ".join(reasons) + ")")
    if not isinstance(fused, str) or fused not in BACKENDS + ("reference", "cuda_emu"):
        raise ValueError(f"fused must be False, True, 'auto' or one of {BACKENDS}, got {fused!r}")
    why = _why_unusable(fused, device)
    if why is not None:
        raise RuntimeError(f"fused={fused!r} cannot run: {why}")
    return fused


def kernels(backend):
    """The kernel table of `backend` (see the module docstring)."""
    if backend in ("cpu", "cuda"):
        return torch.ops.effnet_fast
    if backend == "cuda_emu":
        return torch.ops.effnet_fast_emu
    if backend == "triton":
        return importlib.import_module("effnet_fast.kernels")
    if backend == "reference":
        return importlib.import_module("effnet_fast.ops.reference_kernels")
    raise ValueError(f"unknown backend {backend!r}")
