// The CUDA se_* ops (csrc/cuda/squeeze_excite_ops.h), same launch code and
// kernels, run on CPU tensors through the host emulation.
#define EFFNET_FAST_EMU 1
#include <torch/library.h>

#include "../cuda/squeeze_excite_ops.h"

TORCH_LIBRARY_IMPL(effnet_fast_emu, CPU, m) {
  using namespace effnet_fast::cuda_backend;
  m.impl("se_pool", &se_pool);
  m.impl("se_scale", &se_scale);
  m.impl("se_gate_grad", &se_gate_grad);
}
