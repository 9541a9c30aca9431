// CUDA kernels of the dwconv_bn_silu_* ops (schemas in csrc/op_schemas.h).
#include <torch/library.h>

#include "dwconv_bn_silu_ops.h"

TORCH_LIBRARY_IMPL(effnet_fast, CUDA, m) {
  using namespace effnet_fast::cuda_backend;
  m.impl("dwconv_bn_silu_stats", &dwconv_bn_silu_stats);
  m.impl("dwconv_bn_silu_forward", &dwconv_bn_silu_forward);
  m.impl("dwconv_bn_silu_backward_reduce", &dwconv_bn_silu_backward_reduce);
  m.impl("dwconv_bn_silu_backward", &dwconv_bn_silu_backward);
}
