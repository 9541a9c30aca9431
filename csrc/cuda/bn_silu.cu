// CUDA kernels of the bn_silu_* ops (schemas in csrc/op_schemas.h).
#include <torch/library.h>

#include "bn_silu_ops.h"

TORCH_LIBRARY_IMPL(effnet_fast, CUDA, m) {
  using namespace effnet_fast::cuda_backend;
  m.impl("bn_silu_stats", &bn_silu_stats);
  m.impl("bn_silu_forward", &bn_silu_forward);
  m.impl("bn_silu_backward_reduce", &bn_silu_backward_reduce);
  m.impl("bn_silu_backward", &bn_silu_backward);
}
