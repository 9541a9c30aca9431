"""setup.py's build switches: -march=native for source and editable builds, a portable
baseline for wheels, and the ptxas report only in the developer build."""
import os
import pathlib
import sys

import pytest

SETUP = pathlib.Path(__file__).resolve().parent.parent / "setup.py"


def extensions(monkeypatch, command, **env):
    """The ext_modules setup.py would build for `command`, without building."""
    for name in ("EFFNET_FAST_PORTABLE", "EFFNET_FAST_DEV", "EFFNET_FAST_NO_EXT", "EFFNET_FAST_BUILD_CUDA"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("CUDA_HOME", "TORCH_CUDA_ARCH_LIST"):  # setup.py may set these: restored after the test
        if name in os.environ:
            monkeypatch.setenv(name, os.environ[name])
        else:
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sys, "argv", [str(SETUP), command])
    source = SETUP.read_text().replace("setup(ext_modules=", "dict(ext_modules=")
    namespace = {"__file__": str(SETUP), "__name__": "setup_under_test"}
    exec(compile(source, str(SETUP), "exec"), namespace)
    return namespace["ext_modules"]


def cxx_flags(exts):
    return exts[0].extra_compile_args["cxx"]


@pytest.mark.skipif(__import__("platform").machine() not in ("x86_64", "AMD64"), reason="-march applies to x86-64")
@pytest.mark.parametrize("command, env, native", [
    ("editable_wheel", {}, True),
    ("build_ext", {}, True),
    ("bdist_wheel", {}, False),
    ("bdist_wheel", {"EFFNET_FAST_PORTABLE": "0"}, True),
    ("editable_wheel", {"EFFNET_FAST_PORTABLE": "1"}, False),
])
def test_native_code_only_where_it_is_built(monkeypatch, command, env, native):
    assert ("-march=native" in cxx_flags(extensions(monkeypatch, command, **env))) == native


def test_ptxas_report_only_in_the_developer_build(monkeypatch):
    from torch.utils import cpp_extension
    if cpp_extension.CUDA_HOME is None and not os.path.isdir("/usr/local/cuda/include"):
        pytest.skip("no CUDA toolkit to describe a CUDA build with")
    user = extensions(monkeypatch, "build_ext", EFFNET_FAST_BUILD_CUDA="1")
    dev = extensions(monkeypatch, "build_ext", EFFNET_FAST_BUILD_CUDA="1", EFFNET_FAST_DEV="1")
    assert "-Xptxas=-v" not in user[0].extra_compile_args["nvcc"]
    assert {"-Xptxas=-v", "-lineinfo"} <= set(dev[0].extra_compile_args["nvcc"])
