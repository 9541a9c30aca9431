// The CUDA bn_silu_* ops (csrc/cuda/bn_silu_ops.h), same launch code and
// kernels, run on CPU tensors through the host emulation.
#define EFFNET_FAST_EMU 1
#include <torch/library.h>

#include "../cuda/bn_silu_ops.h"

TORCH_LIBRARY_IMPL(effnet_fast_emu, CPU, m) {
  using namespace effnet_fast::cuda_backend;
  m.impl("bn_silu_stats", &bn_silu_stats);
  m.impl("bn_silu_forward", &bn_silu_forward);
  m.impl("bn_silu_backward_reduce", &bn_silu_backward_reduce);
  m.impl("bn_silu_backward", &bn_silu_backward);
}
