// CUDA kernels of the se_* ops (schemas in csrc/op_schemas.h).
#include <torch/library.h>

#include "squeeze_excite_ops.h"

TORCH_LIBRARY_IMPL(effnet_fast, CUDA, m) {
  using namespace effnet_fast::cuda_backend;
  m.impl("se_pool", &se_pool);
  m.impl("se_scale", &se_scale);
  m.impl("se_gate_grad", &se_gate_grad);
}
