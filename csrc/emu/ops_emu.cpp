// effnet_fast._C_emu: the op schemas of csrc/ops.cpp under the namespace
// effnet_fast_emu, implemented for CPU tensors by the CUDA kernels of csrc/cuda
// run through the host emulation (cuda_emu.h). For tests only.
#include <Python.h>
#include <torch/library.h>

// Importing effnet_fast._C_emu loads this library and runs the registrations.
extern "C" PyObject* PyInit__C_emu(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_emu", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

// Same schemas as TORCH_LIBRARY(effnet_fast, m) in csrc/ops.cpp
// (tests/test_cuda_build.py checks that they stay equal).
TORCH_LIBRARY(effnet_fast_emu, m) {
  m.def("dwconv_bn_silu_stats(Tensor x, Tensor weight, int stride) -> (Tensor, Tensor)");
  m.def("dwconv_bn_silu_forward(Tensor x, Tensor weight, Tensor scale, Tensor shift, int stride) -> Tensor");
  m.def("dwconv_bn_silu_backward_reduce(Tensor grad_out, Tensor x, Tensor weight, Tensor scale, "
        "Tensor shift, Tensor mean, int stride) -> (Tensor, Tensor)");
  m.def("dwconv_bn_silu_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor scale, Tensor shift, "
        "Tensor coef_a, Tensor coef_b, Tensor coef_c, int stride) -> (Tensor, Tensor)");
  m.def("se_pool(Tensor x) -> Tensor");
  m.def("se_scale(Tensor x, Tensor gate, Tensor? bias=None) -> Tensor");
  m.def("se_gate_grad(Tensor grad_out, Tensor x) -> Tensor");
}
