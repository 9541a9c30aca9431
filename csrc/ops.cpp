// effnet_fast._C: the op schemas (csrc/op_schemas.h) under the namespace
// effnet_fast; csrc/cpu and csrc/cuda register their kernels for them.
#include <Python.h>

#include "op_schemas.h"

// Importing effnet_fast._C loads this library and runs the registrations.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(effnet_fast, m) { effnet_fast::define_ops(m); }
