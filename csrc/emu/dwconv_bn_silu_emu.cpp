// The CUDA dwconv_bn_silu_* ops (csrc/cuda/dwconv_bn_silu_ops.h), same launch
// code and kernels, run on CPU tensors through the host emulation.
#define EFFNET_FAST_EMU 1
#include <torch/library.h>

#include "../cuda/dwconv_bn_silu_ops.h"

TORCH_LIBRARY_IMPL(effnet_fast_emu, CPU, m) {
  using namespace effnet_fast::cuda_backend;
  m.impl("dwconv_bn_silu_stats", &dwconv_bn_silu_stats);
  m.impl("dwconv_bn_silu_forward", &dwconv_bn_silu_forward);
  m.impl("dwconv_bn_silu_backward_reduce", &dwconv_bn_silu_backward_reduce);
  m.impl("dwconv_bn_silu_backward", &dwconv_bn_silu_backward);
}
