"""The fused backends, described once (`REGISTRY`), and what this install can run.

A backend's kernel table offers the kernel-level ops declared in csrc/op_schemas.h
(dwconv_bn_silu_stats, ..., se_gate_grad) as attributes. Everything else that names
backends (the model's `fused` check, `fused=True`'s choice, `build_info`, the tests'
backend and dtype matrix, the benchmarks) is derived from the registry below.
"""
import functools
import importlib
import os
from dataclasses import dataclass
from typing import Callable

import torch

from .kernel_fakes import register_kernel_fakes

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


@dataclass(frozen=True)
class Backend:
    name: str
    description: str
    device_types: tuple  # device types of the tensors it runs on
    dtypes: tuple  # the dtypes it runs and the tests check
    built: Callable[[], bool]  # whether this install has it
    kernel_module: str  # module holding its kernel table
    tests_only: bool = False  # not offered to users (`fused=`), kept to check the others
    gradcheck: bool = False  # runs float64, so torch.autograd.gradcheck applies

    def runs_on(self, device_type):
        if self.name == "triton" and device_type == "cpu":
            return triton_interpreted()
        return device_type in self.device_types


_F32, _F64, _F16, _BF16 = torch.float32, torch.float64, torch.float16, torch.bfloat16
REGISTRY = {b.name: b for b in (
    Backend("cpu", "C++ kernels for CPU tensors", ("cpu",), (_F32, _F64, _BF16, _F16), cpu_built,
            "torch.ops.effnet_fast", gradcheck=True),
    Backend("cuda", "CUDA C++ kernels", ("cuda",), (_F32, _F16, _BF16), cuda_built, "torch.ops.effnet_fast"),
    Backend("triton", "Triton kernels (CPU tensors too under TRITON_INTERPRET=1)", ("cuda",), (_F32, _F16, _BF16),
            triton_built, "effnet_fast.kernels"),
    Backend("reference", "the kernel ops written in plain torch", ("cpu", "cuda"), (_F32, _F64), lambda: True,
            "effnet_fast.ops.reference_kernels", tests_only=True, gradcheck=True),
    Backend("cuda_emu", "the CUDA kernel sources compiled for the host", ("cpu",), (_F32, _F64), cuda_emu_built,
            "torch.ops.effnet_fast_emu", tests_only=True, gradcheck=True),
)}
# The backends a user picks with `fused=`.
BACKENDS = tuple(name for name, b in REGISTRY.items() if not b.tests_only)


def backends_for(device_type):
    """The user backends (`BACKENDS`) whose kernels run on tensors of `device_type`,
    in the order fused=True tries them, then the others."""
    names = [n for n in BACKENDS if device_type in REGISTRY[n].device_types]
    preferred = AUTO_PREFERENCE.get(device_type, ())
    return tuple(sorted(names, key=lambda n: preferred.index(n) if n in preferred else len(preferred)))

# The order in which fused=True tries the backends on each device type.
AUTO_PREFERENCE = {"cpu": ("cpu",), "cuda": ("triton", "cuda")}
# Every dtype some backend runs (each backend refuses the others with a message naming them).
ALL_DTYPES = tuple(dict.fromkeys(d for b in REGISTRY.values() for d in b.dtypes))


def build_info():
    """What this install can run. `kernels_built` says which backends are compiled or
    installed; `cuda_device_available` whether a GPU is visible to torch; `fused_true_picks`
    what fused=True chooses for CPU and CUDA tensors here (None: nothing can run)."""
    return {
        "kernels_built": {name: b.built() for name, b in REGISTRY.items()},
        "cuda_device_available": torch.cuda.is_available(),
        "fused_true_picks": {kind: _first_usable(kind) for kind in AUTO_PREFERENCE},
        "triton_interpret": triton_interpreted(),
        "torch": torch.__version__,
        "import_errors": dict(_import_errors),
    }


def backend_built(name):
    return REGISTRY[name].built()


def _first_usable(device_type):
    if device_type == "cuda" and not torch.cuda.is_available():
        return None
    device = torch.device(device_type)
    return next((n for n in AUTO_PREFERENCE[device_type] if _why_unusable(n, device) is None), None)


_BUILD_HINT = ("Build it with `pip install -e .` (needs a C++ compiler; the CUDA part also needs "
               "nvcc and a CUDA build of torch, or EFFNET_FAST_BUILD_CUDA=1).")


_NOT_BUILT = {
    "cpu": lambda: "the C++ extension effnet_fast._C is not built ("
                   + _import_errors.get("effnet_fast._C", "no CPU kernels registered") + "). " + _BUILD_HINT,
    "cuda": lambda: "effnet_fast._C was built without its CUDA kernels. " + _BUILD_HINT,
    "triton": lambda: f"Triton is not installed ({_import_errors.get('triton')}); `pip install triton`",
    "cuda_emu": lambda: f"effnet_fast._C_emu is not built. {_BUILD_HINT}",
}


def _why_unusable(backend, device):
    """None when `backend` can run on tensors of `device`, else the reason."""
    b = REGISTRY.get(backend)
    if b is None:
        return f"unknown backend {backend!r}; choose one of {tuple(REGISTRY)}"
    if not b.built():
        return _NOT_BUILT[backend]()
    if not b.runs_on(device.type):
        return f"backend {backend!r} ({b.description}) runs on {' or '.join(b.device_types)} tensors, got a {device.type} tensor"
    return None


def check_fused_setting(fused):
    """Raise ValueError unless `fused` is False/None, True, 'auto' or a backend name."""
    if fused is False or fused is None or fused is True or fused == "auto" or fused in REGISTRY:
        return
    raise ValueError(f"fused must be False, True, 'auto' or one of {BACKENDS}, got {fused!r}")


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
        candidates = AUTO_PREFERENCE.get(device.type, ())
        reasons = []
        for name in candidates:
            why = _why_unusable(name, device)
            if why is None:
                return name
            reasons.append(f"{name}: {why}")
        raise RuntimeError(f"fused=True: no fused backend can run on {device.type} tensors ("
                           + "; ".join(reasons) + ")")
    check_fused_setting(fused)
    why = _why_unusable(fused, device)
    if why is not None:
        raise RuntimeError(f"fused={fused!r} cannot run: {why}")
    return fused


def kernels(backend):
    """The kernel table of `backend` (see the module docstring)."""
    if backend not in REGISTRY:
        raise ValueError(f"unknown backend {backend!r}")
    module = REGISTRY[backend].kernel_module
    if module.startswith("torch.ops."):
        return getattr(torch.ops, module.removeprefix("torch.ops."))
    return _kernel_package(module)


@functools.cache
def _kernel_package(module):
    """Import a Python kernel package once, giving its kernel ops (Triton's) their fakes."""
    table = importlib.import_module(module)
    namespace = getattr(table, "NAMESPACE", None)
    if namespace is not None:
        register_kernel_fakes(namespace)
    return table
