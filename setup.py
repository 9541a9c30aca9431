"""Build effnet_fast._C (C++ CPU kernels, plus CUDA kernels when possible) and
effnet_fast._C_emu (the CUDA kernel sources compiled for the host, for tests).

Environment:
  EFFNET_FAST_BUILD_CUDA=1  force the CUDA part (needs nvcc); =0 skips it.
  TORCH_CUDA_ARCH_LIST      defaults to "8.0;9.0" when no GPU is visible.
  EFFNET_FAST_NO_EXT=1      build no extension at all (reference path only).
  EFFNET_FAST_PORTABLE=1    CPU kernels for the baseline x86-64 ISA instead of -march=native;
                            the default for wheels (`python -m build`), =0 turns it off there.
  EFFNET_FAST_DEV=1         developer build: nvcc -lineinfo and the ptxas resource report
                            (-Xptxas=-v), which csrc/cuda/ptxas_table.py turns into a table.

Objects are kept in build/ (ninja), so a rebuild, even through `pip install -e .`,
recompiles only the sources, headers and flags that changed.
"""
import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# torch guesses CUDA_HOME from the nvcc on PATH, which may be a wrapper without headers.
if "CUDA_HOME" not in os.environ and os.path.isdir("/usr/local/cuda/include"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _want_cuda(torch, cuda_home):
    flag = os.environ.get("EFFNET_FAST_BUILD_CUDA")
    if flag is not None:
        return flag == "1"
    return torch.version.cuda is not None and cuda_home is not None


def _extensions():
    if os.environ.get("EFFNET_FAST_NO_EXT") == "1":
        return [], {}
    import torch
    from torch.utils import cpp_extension

    cxx = ["-O3", "-std=c++20", "-fopenmp"]
    # The CPU kernels are built for the machine that builds them (as a source install
    # is); a wheel, which may run elsewhere, for the baseline ISA.
    if not _portable() and _x86_64():
        cxx += ["-march=native"]
    define_macros = [("Py_LIMITED_API", "0x030A0000")]
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    ext_cls = cpp_extension.CppExtension
    extra = {"cxx": cxx}
    if _want_cuda(torch, cpp_extension.CUDA_HOME):
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        sources += _sources("csrc/cuda/*.cu")
        ext_cls = cpp_extension.CUDAExtension
        define_macros.append(("EFFNET_FAST_WITH_CUDA", "1"))
        extra["nvcc"] = ["-O3", "-std=c++20", "--use_fast_math"]
        if os.environ.get("EFFNET_FAST_DEV") == "1":
            extra["nvcc"] += ["-lineinfo", "-Xptxas=-v"]
    exts = [
        ext_cls("effnet_fast._C", sources, extra_compile_args=extra,
                define_macros=define_macros, py_limited_api=True, extra_link_args=["-fopenmp"]),
    ]
    emu_sources = _sources("csrc/emu/*.cpp")
    if emu_sources:
        exts.append(cpp_extension.CppExtension(
            "effnet_fast._C_emu", emu_sources, extra_compile_args={"cxx": ["-O1", "-std=c++20", "-g0"]},
            define_macros=[("Py_LIMITED_API", "0x030A0000")], py_limited_api=True))
    return exts, {"build_ext": _persistent_build_ext(cpp_extension.BuildExtension)}


def _persistent_build_ext(base):
    """BuildExtension with ninja and its objects in build/temp, kept between builds:
    pip's editable and wheel builds otherwise compile everything in a fresh temporary folder."""

    class PersistentBuildExt(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, use_ninja=True, **kwargs)

        def finalize_options(self):
            super().finalize_options()
            self.build_temp = os.path.join(ROOT, "build", "temp")

    return PersistentBuildExt


def _portable():
    flag = os.environ.get("EFFNET_FAST_PORTABLE")
    if flag is not None:
        return flag == "1"
    return "bdist_wheel" in sys.argv


def _x86_64():
    import platform
    return platform.machine() in ("x86_64", "AMD64")


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass,
      options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {})
