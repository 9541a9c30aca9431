// Operator schemas, declared once for every backend.
//
// These are the kernel-level ops; the differentiable ops that models call
// (effnet_fast::dwconv_bn_silu, effnet_fast::bn_silu, effnet_fast::squeeze_excite) are defined in
// effnet_fast/ops/ on top of them. x is (N, C, H, W), contiguous or
// channels_last; outputs keep x's memory format. Per-channel vectors are in
// the accumulation dtype: float64 for float64 inputs, float32 otherwise.
#pragma once
#include <torch/library.h>

namespace effnet_fast {

inline void define_ops(torch::Library& m) {
  // Depthwise conv (k x k, stride) + BatchNorm + SiLU. `padding`: (top, bottom, left, right)
  // zeros, each in [0, k // 2] (TF 'same' padding is asymmetric for stride 2); None pads
  // k // 2 on every side. The output is ((H + top + bottom - k) / stride + 1) x (likewise W).
  // Per-channel mean and biased variance of y = dwconv(x, weight).
  m.def("dwconv_bn_silu_stats(Tensor x, Tensor weight, int stride, int[]? padding=None) -> (Tensor, Tensor)");
  // out = silu(y * scale[c] + shift[c]).
  m.def("dwconv_bn_silu_forward(Tensor x, Tensor weight, Tensor scale, Tensor shift, int stride, "
        "int[]? padding=None) -> Tensor");
  // With z = y * scale + shift and dz = grad_out * silu'(z):
  // (sum dz, sum dz * (y - mean)) per channel.
  m.def("dwconv_bn_silu_backward_reduce(Tensor grad_out, Tensor x, Tensor weight, Tensor scale, "
        "Tensor shift, Tensor mean, int stride, int[]? padding=None) -> (Tensor, Tensor)");
  // With dy = coef_a[c] * dz + coef_b[c] * y + coef_c[c]:
  // (grad_x, grad_weight) of y = dwconv(x, weight).
  m.def("dwconv_bn_silu_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor scale, Tensor shift, "
        "Tensor coef_a, Tensor coef_b, Tensor coef_c, int stride, int[]? padding=None) -> (Tensor, Tensor)");

  // BatchNorm + SiLU of a tensor y (the output of the stem, expand and head convs).
  // Per-channel mean and biased variance of y.
  m.def("bn_silu_stats(Tensor y) -> (Tensor, Tensor)");
  // out = silu(y * scale[c] + shift[c]).
  m.def("bn_silu_forward(Tensor y, Tensor scale, Tensor shift) -> Tensor");
  // With z = y * scale + shift and dz = grad_out * silu'(z):
  // (sum dz, sum dz * (y - mean)) per channel.
  m.def("bn_silu_backward_reduce(Tensor grad_out, Tensor y, Tensor scale, Tensor shift, Tensor mean) "
        "-> (Tensor, Tensor)");
  // grad_y = coef_a[c] * dz + coef_b[c] * y + coef_c[c].
  m.def("bn_silu_backward(Tensor grad_out, Tensor y, Tensor scale, Tensor shift, Tensor coef_a, "
        "Tensor coef_b, Tensor coef_c) -> Tensor");

  // Squeeze-excitation.
  // (N, C) mean of x over H and W.
  m.def("se_pool(Tensor x) -> Tensor");
  // out = x * gate[n, c] (+ bias[n, c]).
  m.def("se_scale(Tensor x, Tensor gate, Tensor? bias=None) -> Tensor");
  // (N, C) sum over H and W of grad_out * x.
  m.def("se_gate_grad(Tensor grad_out, Tensor x) -> Tensor");
}

}  // namespace effnet_fast
