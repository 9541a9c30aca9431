// effnet_fast._C_emu: the op schemas of csrc/op_schemas.h under the namespace
// effnet_fast_emu, implemented for CPU tensors by the CUDA kernels of csrc/cuda
// run through the host emulation (cuda_emu.h). For tests only.
#include <Python.h>
#include "../op_schemas.h"

// Importing effnet_fast._C_emu loads this library and runs the registrations.
extern "C" PyObject* PyInit__C_emu(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_emu", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

// The schemas of csrc/op_schemas.h, under another namespace.
TORCH_LIBRARY(effnet_fast_emu, m) { effnet_fast::define_ops(m); }
