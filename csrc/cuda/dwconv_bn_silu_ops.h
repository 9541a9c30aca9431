// The dwconv_bn_silu_* ops (csrc/op_schemas.h) on top of the kernels of
// dwconv_bn_silu_kernels.cuh: input checks, grids and launches. Included by
// dwconv_bn_silu.cu (CUDA) and by csrc/emu (host emulation).
#pragma once

#include <tuple>

#include "../dw_padding.h"
#include "dwconv_bn_silu_kernels.cuh"
#include "launch_common.h"

namespace effnet_fast::cuda_backend {

struct ConvProblem {
  at::Tensor x, weight;
  bool channels_last;
  int k;
  at::ScalarType acc;
  ConvGeom g;
};

inline ConvProblem conv_problem(const char* op, const at::Tensor& x_in, const at::Tensor& weight, int64_t stride,
                                at::OptionalIntArrayRef padding) {
  TORCH_CHECK(x_in.dim() == 4, op, ": expected x of shape (N, C, H, W), got ", x_in.sizes());
  check_device(x_in, x_in, op, "x");
  check_device(weight, x_in, op, "weight");
  TORCH_CHECK(x_in.numel() > 0, op, ": x is empty, shape ", x_in.sizes());
  const int64_t N = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == C && weight.size(1) == 1 && weight.size(2) == weight.size(3),
              op, ": x has ", C, " channels but the depthwise weight has shape ", weight.sizes(), "; expected (", C,
              ", 1, k, k)");
  const int64_t k = weight.size(3);
  TORCH_CHECK(k == 3 || k == 5, op, ": unsupported kernel size ", k, " (3 or 5)");
  TORCH_CHECK(stride == 1 || stride == 2, op, ": unsupported stride ", stride, " (1 or 2)");
  TORCH_CHECK(weight.scalar_type() == x_in.scalar_type(), op, ": weight dtype ", weight.scalar_type(),
              " differs from x dtype ", x_in.scalar_type());
  TORCH_CHECK(H * W <= std::numeric_limits<int32_t>::max(), op, ": plane ", H, "x", W,
              " is too large (H * W must fit in 32 bits)");
  TORCH_CHECK(W * C <= std::numeric_limits<int32_t>::max(), op, ": rows of ", W, " x ", C,
              " elements are too large (W * C must fit in 32 bits)");
  check_grid_dim(C, kMaxGridX, op, "channels");
  ConvProblem p;
  p.x = supported_layout(x_in);
  p.weight = weight.contiguous();
  p.channels_last = is_channels_last(p.x);
  p.k = int(k);
  p.acc = acc_dtype(x_in.scalar_type());
  const DwPadding pad = dw_padding(padding, k, stride, H, W, op);
  p.g = ConvGeom{N, C, int(H), int(W), int(pad.out_h), int(pad.out_w), int(stride), int(pad.top), int(pad.left), 0, 0.0};
  return p;
}

// Chunks of `count` positions for the grid's y dimension: about 8 positions per
// thread, at most 1024 chunks (bounds the partials).
inline Chunks position_chunks(const ConvProblem& p, int64_t count) {
  return split_chunks(count, p.channels_last ? kRows * 16 : kThreads * 8, 1024);
}

// The geometry for a launch over `chunks` of the (rows, cols) planes.
inline ConvGeom iteration(const ConvGeom& g, const Chunks& chunks, int rows, int cols) {
  ConvGeom it = g;
  it.chunk_len = chunks.len;
  it.inv_plane = 1.0 / (double(rows) * cols);
  return it;
}

inline dim3 conv_grid(const ConvProblem& p, const Chunks& chunks) {
  const int64_t x = p.channels_last ? ceil_div(p.g.C, kWarp) : p.g.C;
  return dim3(unsigned(x), unsigned(chunks.count));
}

inline at::Tensor output_like(const ConvProblem& p, int64_t rows, int64_t cols, at::ScalarType dtype) {
  at::Tensor t = at::empty({p.g.N, p.g.C, rows, cols},
                           p.x.options().dtype(dtype).memory_format(memory_format(p.channels_last)));
  poison_output(t);
  return t;
}

inline at::Tensor acc_buffer(const ConvProblem& p, at::IntArrayRef sizes) {
  at::Tensor t = at::empty(sizes, p.x.options().dtype(p.acc));
  poison_output(t);
  return t;
}

// grad_out as a tensor of the output's shape and x's layout.
inline at::Tensor grad_like_output(const ConvProblem& p, const at::Tensor& grad_out, const char* op) {
  check_device(grad_out, p.x, op, "grad_out");
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == p.g.N && grad_out.size(1) == p.g.C &&
                  grad_out.size(2) == p.g.OH && grad_out.size(3) == p.g.OW,
              op, ": grad_out has shape ", grad_out.sizes(), ", expected (", p.g.N, ", ", p.g.C, ", ", p.g.OH, ", ",
              p.g.OW, ")");
  TORCH_CHECK(grad_out.scalar_type() == p.x.scalar_type(), op, ": grad_out dtype ", grad_out.scalar_type(),
              " differs from x dtype ", p.x.scalar_type());
  return grad_out.contiguous(memory_format(p.channels_last));
}

// Calls f(scalar_t{}, K constant, CL constant) for the problem's dtype, kernel size and layout.
template <class F>
void dispatch_conv(const ConvProblem& p, const char* op, F&& f) {
  dispatch_floating(p.x.scalar_type(), op, [&](auto tag) {
    dispatch_kernel_size(p.k, [&](auto k_const) {
      dispatch_layout(p.channels_last, [&](auto cl_const) { f(tag, k_const, cl_const); });
    });
  });
}

// out[col] = sum over chunks of partials[chunk][col * col_step] (row stride row_stride).
template <class acc_t, class out_t>
void launch_sum_columns(const acc_t* partials, int64_t rows, int64_t row_stride, int64_t cols, int64_t col_step,
                        out_t* out) {
  auto kernel = sum_columns_kernel<acc_t, out_t>;
  const size_t smem = reduce_rows_smem<Sums<acc_t, 1>>();  // outside the macro: its comma
  EFFNET_LAUNCH(kernel, dim3(unsigned(ceil_div(cols, kWarp))), dim3(kWarp, kRows), smem,
                partials, rows, row_stride, cols, col_step, out);
}

inline std::tuple<at::Tensor, at::Tensor> dwconv_bn_silu_stats(const at::Tensor& x, const at::Tensor& weight,
                                                               int64_t stride,
                                                               at::OptionalIntArrayRef padding) {
  constexpr const char* op = "dwconv_bn_silu_stats";
  ConvProblem p = conv_problem(op, x, weight, stride, padding);
  DeviceScope scope(p.x);
  const Chunks chunks = position_chunks(p, p.g.N * p.g.OH * p.g.OW);
  p.g = iteration(p.g, chunks, p.g.OH, p.g.OW);
  const int64_t C = p.g.C;
  at::Tensor partials = acc_buffer(p, {chunks.count, C, 3});
  at::Tensor mean = acc_buffer(p, {C}), var = acc_buffer(p, {C});
  dispatch_conv(p, op, [&](auto tag, auto k_const, auto cl_const) {
    using scalar_t = decltype(tag);
    using acc_t = acc_type<scalar_t>;
    auto* moments = reinterpret_cast<Moments<acc_t>*>(partials.mutable_data_ptr<acc_t>());
    auto stats = dw_stats_kernel<decltype(k_const)::value, decltype(cl_const)::value, scalar_t, acc_t>;
    EFFNET_LAUNCH(stats, conv_grid(p, chunks), dim3(kWarp, kRows), reduce_rows_smem<Moments<acc_t>>(),
                  p.x.const_data_ptr<scalar_t>(), p.weight.const_data_ptr<scalar_t>(), p.g, moments);
    auto finalize = dw_finalize_stats_kernel<acc_t>;
    EFFNET_LAUNCH(finalize, dim3(unsigned(ceil_div(C, kWarp))), dim3(kWarp, kRows),
                  reduce_rows_smem<Moments<acc_t>>(), static_cast<const Moments<acc_t>*>(moments), chunks.count, C,
                  mean.mutable_data_ptr<acc_t>(), var.mutable_data_ptr<acc_t>());
  });
  return {mean, var};
}

inline at::Tensor dwconv_bn_silu_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                                         const at::Tensor& shift, int64_t stride,
                                         at::OptionalIntArrayRef padding) {
  constexpr const char* op = "dwconv_bn_silu_forward";
  ConvProblem p = conv_problem(op, x, weight, stride, padding);
  DeviceScope scope(p.x);
  const at::Tensor a = channel_vector(scale, p.x, p.g.C, p.acc, op, "scale");
  const at::Tensor b = channel_vector(shift, p.x, p.g.C, p.acc, op, "shift");
  const Chunks chunks = position_chunks(p, p.g.N * p.g.OH * p.g.OW);
  p.g = iteration(p.g, chunks, p.g.OH, p.g.OW);
  at::Tensor out = output_like(p, p.g.OH, p.g.OW, p.x.scalar_type());
  dispatch_conv(p, op, [&](auto tag, auto k_const, auto cl_const) {
    using scalar_t = decltype(tag);
    using acc_t = acc_type<scalar_t>;
    auto kernel = dw_forward_kernel<decltype(k_const)::value, decltype(cl_const)::value, scalar_t, acc_t>;
    EFFNET_LAUNCH(kernel, conv_grid(p, chunks), dim3(kWarp, kRows), 0, p.x.const_data_ptr<scalar_t>(),
                  p.weight.const_data_ptr<scalar_t>(), a.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(), p.g,
                  out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

inline std::tuple<at::Tensor, at::Tensor> dwconv_bn_silu_backward_reduce(const at::Tensor& grad_out,
                                                                         const at::Tensor& x, const at::Tensor& weight,
                                                                         const at::Tensor& scale,
                                                                         const at::Tensor& shift,
                                                                         const at::Tensor& mean, int64_t stride,
                                                                         at::OptionalIntArrayRef padding) {
  constexpr const char* op = "dwconv_bn_silu_backward_reduce";
  ConvProblem p = conv_problem(op, x, weight, stride, padding);
  DeviceScope scope(p.x);
  const int64_t C = p.g.C;
  const at::Tensor grad = grad_like_output(p, grad_out, op);
  const at::Tensor a = channel_vector(scale, p.x, C, p.acc, op, "scale");
  const at::Tensor b = channel_vector(shift, p.x, C, p.acc, op, "shift");
  const at::Tensor mu = channel_vector(mean, p.x, C, p.acc, op, "mean");
  const Chunks chunks = position_chunks(p, p.g.N * p.g.OH * p.g.OW);
  p.g = iteration(p.g, chunks, p.g.OH, p.g.OW);
  at::Tensor partials = acc_buffer(p, {chunks.count, C, 2});
  at::Tensor sum_dz = acc_buffer(p, {C}), sum_dz_xmu = acc_buffer(p, {C});
  dispatch_conv(p, op, [&](auto tag, auto k_const, auto cl_const) {
    using scalar_t = decltype(tag);
    using acc_t = acc_type<scalar_t>;
    auto kernel = dw_backward_reduce_kernel<decltype(k_const)::value, decltype(cl_const)::value, scalar_t, acc_t>;
    const size_t smem = reduce_rows_smem<Sums<acc_t, 2>>();  // outside the macro: its comma
    EFFNET_LAUNCH(kernel, conv_grid(p, chunks), dim3(kWarp, kRows), smem,
                  grad.const_data_ptr<scalar_t>(), p.x.const_data_ptr<scalar_t>(), p.weight.const_data_ptr<scalar_t>(),
                  a.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(), mu.const_data_ptr<acc_t>(), p.g,
                  partials.mutable_data_ptr<acc_t>());
    const acc_t* sums = partials.const_data_ptr<acc_t>();
    launch_sum_columns(sums, chunks.count, 2 * C, C, 2, sum_dz.mutable_data_ptr<acc_t>());
    launch_sum_columns(sums + 1, chunks.count, 2 * C, C, 2, sum_dz_xmu.mutable_data_ptr<acc_t>());
  });
  return {sum_dz, sum_dz_xmu};
}

inline std::tuple<at::Tensor, at::Tensor> dwconv_bn_silu_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
    const at::Tensor& shift, const at::Tensor& coef_a, const at::Tensor& coef_b, const at::Tensor& coef_c,
    int64_t stride, at::OptionalIntArrayRef padding) {
  constexpr const char* op = "dwconv_bn_silu_backward";
  ConvProblem p = conv_problem(op, x, weight, stride, padding);
  DeviceScope scope(p.x);
  const int64_t C = p.g.C, taps = int64_t(p.k) * p.k;
  const at::Tensor grad = grad_like_output(p, grad_out, op);
  const at::Tensor a = channel_vector(scale, p.x, C, p.acc, op, "scale");
  const at::Tensor b = channel_vector(shift, p.x, C, p.acc, op, "shift");
  const at::Tensor ca = channel_vector(coef_a, p.x, C, p.acc, op, "coef_a");
  const at::Tensor cb = channel_vector(coef_b, p.x, C, p.acc, op, "coef_b");
  const at::Tensor cc = channel_vector(coef_c, p.x, C, p.acc, op, "coef_c");
  // Pass 1 over output positions: dy and the weight-gradient partials.
  const Chunks out_chunks = position_chunks(p, p.g.N * p.g.OH * p.g.OW);
  const ConvGeom out_geom = iteration(p.g, out_chunks, p.g.OH, p.g.OW);
  // Pass 2 over input positions: grad_x gathers dy.
  const Chunks in_chunks = position_chunks(p, p.g.N * p.g.H * p.g.W);
  const ConvGeom in_geom = iteration(p.g, in_chunks, p.g.H, p.g.W);
  at::Tensor dy = output_like(p, p.g.OH, p.g.OW, p.acc);
  at::Tensor partials = acc_buffer(p, {out_chunks.count, C, taps});
  at::Tensor grad_x = output_like(p, p.g.H, p.g.W, p.x.scalar_type());
  at::Tensor grad_w = at::empty(p.weight.sizes(), p.weight.options());
  poison_output(grad_w);
  dispatch_conv(p, op, [&](auto tag, auto k_const, auto cl_const) {
    using scalar_t = decltype(tag);
    using acc_t = acc_type<scalar_t>;
    constexpr int K = decltype(k_const)::value;
    constexpr bool CL = decltype(cl_const)::value;
    auto dy_kernel = dw_backward_dy_kernel<K, CL, scalar_t, acc_t>;
    const size_t smem = reduce_rows_smem<Sums<acc_t, K * K>>();  // outside the macro: its comma
    EFFNET_LAUNCH(dy_kernel, conv_grid(p, out_chunks), dim3(kWarp, kRows), smem,
                  grad.const_data_ptr<scalar_t>(), p.x.const_data_ptr<scalar_t>(), p.weight.const_data_ptr<scalar_t>(),
                  a.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(), ca.const_data_ptr<acc_t>(),
                  cb.const_data_ptr<acc_t>(), cc.const_data_ptr<acc_t>(), out_geom, dy.mutable_data_ptr<acc_t>(),
                  partials.mutable_data_ptr<acc_t>());
    auto input_kernel = dw_backward_input_kernel<K, CL, scalar_t, acc_t>;
    EFFNET_LAUNCH(input_kernel, conv_grid(p, in_chunks), dim3(kWarp, kRows), 0, dy.const_data_ptr<acc_t>(),
                  p.weight.const_data_ptr<scalar_t>(), in_geom, grad_x.mutable_data_ptr<scalar_t>());
    launch_sum_columns(partials.const_data_ptr<acc_t>(), out_chunks.count, C * taps, C * taps, int64_t(1),
                       grad_w.mutable_data_ptr<scalar_t>());
  });
  return {grad_x, grad_w};
}

}  // namespace effnet_fast::cuda_backend
