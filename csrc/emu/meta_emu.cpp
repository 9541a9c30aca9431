// Shape-only (Meta) kernels of the effnet_fast_emu ops, so fake tensors and
// torch.compile / opcheck can trace the backward formulas that call them.
// Sizes are SymInts: dynamic shapes stay symbolic.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace {

at::ScalarType acc_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

at::MemoryFormat format_of(const at::Tensor& x) {
  return x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous() ? at::MemoryFormat::ChannelsLast
                                                                                : at::MemoryFormat::Contiguous;
}

at::Tensor channel_vector(const at::Tensor& x) {
  return at::empty_symint({x.sym_size(1)}, x.options().dtype(acc_dtype(x)));
}

at::Tensor conv_output(const at::Tensor& x, const at::Tensor& weight, int64_t stride) {
  const int64_t k = weight.sym_size(3).guard_int(__FILE__, __LINE__), pad = k / 2;
  c10::SymInt oh = (x.sym_size(2) + 2 * pad - k) / stride + 1;
  c10::SymInt ow = (x.sym_size(3) + 2 * pad - k) / stride + 1;
  return at::empty_symint({x.sym_size(0), x.sym_size(1), oh, ow}, x.options(), format_of(x));
}

std::tuple<at::Tensor, at::Tensor> stats(const at::Tensor& x, const at::Tensor&, int64_t) {
  return {channel_vector(x), channel_vector(x)};
}

at::Tensor forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor&, const at::Tensor&,
                   int64_t stride) {
  return conv_output(x, weight, stride);
}

std::tuple<at::Tensor, at::Tensor> backward_reduce(const at::Tensor&, const at::Tensor& x, const at::Tensor&,
                                                   const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t) {
  return {channel_vector(x), channel_vector(x)};
}

std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor&, const at::Tensor& x, const at::Tensor& weight,
                                            const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                            const at::Tensor&, const at::Tensor&, int64_t) {
  return {at::empty_symint(x.sym_sizes(), x.options(), format_of(x)),
          at::empty_symint(weight.sym_sizes(), weight.options())};
}

at::Tensor plane_vector(const at::Tensor& x) {
  return at::empty_symint({x.sym_size(0), x.sym_size(1)}, x.options().dtype(acc_dtype(x)));
}

at::Tensor se_pool(const at::Tensor& x) {
  return plane_vector(x);
}

at::Tensor se_scale(const at::Tensor& x, const at::Tensor&, const std::optional<at::Tensor>&) {
  return at::empty_symint(x.sym_sizes(), x.options(), format_of(x));
}

at::Tensor se_gate_grad(const at::Tensor&, const at::Tensor& x) {
  return plane_vector(x);
}

}  // namespace

TORCH_LIBRARY_IMPL(effnet_fast_emu, Meta, m) {
  m.impl("dwconv_bn_silu_stats", &stats);
  m.impl("dwconv_bn_silu_forward", &forward);
  m.impl("dwconv_bn_silu_backward_reduce", &backward_reduce);
  m.impl("dwconv_bn_silu_backward", &backward);
  m.impl("se_pool", &se_pool);
  m.impl("se_scale", &se_scale);
  m.impl("se_gate_grad", &se_gate_grad);
}
