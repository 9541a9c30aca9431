// The bn_silu_* ops (csrc/op_schemas.h) on top of the kernels of
// bn_silu_kernels.cuh: input checks, grids and launches. Included by bn_silu.cu
// (CUDA) and by csrc/emu (host emulation).
#pragma once

#include <tuple>

#include "bn_silu_kernels.cuh"
#include "dwconv_bn_silu_ops.h"  // launch_sum_columns
#include "launch_common.h"

namespace effnet_fast::cuda_backend {

struct BnProblem {
  at::Tensor y;
  bool channels_last;
  at::ScalarType acc;
  int64_t N, C, hw;
};

inline BnProblem bn_problem(const char* op, const at::Tensor& y_in) {
  TORCH_CHECK(y_in.dim() == 4, op, ": expected y of shape (N, C, H, W), got ", y_in.sizes());
  check_device(y_in, y_in, op, "y");
  TORCH_CHECK(y_in.numel() > 0, op, ": y is empty, shape ", y_in.sizes());
  const int64_t hw = y_in.size(2) * y_in.size(3);
  TORCH_CHECK(hw <= std::numeric_limits<int32_t>::max(), op, ": plane ", y_in.size(2), "x", y_in.size(3),
              " is too large (H * W must fit in 32 bits)");
  check_grid_dim(y_in.size(1), kMaxGridX, op, "channels");
  const at::Tensor y = supported_layout(y_in);
  return {y, is_channels_last(y), acc_dtype(y.scalar_type()), y.size(0), y.size(1), hw};
}

// Chunks of the N * H * W positions for a reduction's grid.y: about 8 positions
// per thread, at most 1024 chunks (bounds the partials).
inline PlaneGeom reduction_geometry(const BnProblem& p, Chunks& chunks) {
  const int64_t count = p.N * p.hw;
  chunks = split_chunks(count, p.channels_last ? kRows * 16 : kThreads * 8, 1024);
  return {p.C, int(p.hw), count, chunks.len, 1.0 / double(p.hw)};
}

inline dim3 reduction_grid(const BnProblem& p, const Chunks& chunks) {
  return dim3(unsigned(p.channels_last ? ceil_div(p.C, kWarp) : p.C), unsigned(chunks.count));
}

inline at::Tensor bn_acc_buffer(const BnProblem& p, at::IntArrayRef sizes) {
  at::Tensor t = at::empty(sizes, p.y.options().dtype(p.acc));
  poison_output(t);
  return t;
}

inline at::Tensor bn_output(const BnProblem& p) {
  at::Tensor t = at::empty(p.y.sizes(), p.y.options().memory_format(memory_format(p.channels_last)));
  poison_output(t);
  return t;
}

inline at::Tensor grad_like_y(const BnProblem& p, const at::Tensor& grad_out, const char* op) {
  check_device(grad_out, p.y, op, "grad_out");
  TORCH_CHECK(grad_out.sizes() == p.y.sizes(), op, ": grad_out has shape ", grad_out.sizes(), ", expected ",
              p.y.sizes());
  TORCH_CHECK(grad_out.scalar_type() == p.y.scalar_type(), op, ": grad_out dtype ", grad_out.scalar_type(),
              " differs from y dtype ", p.y.scalar_type());
  return grad_out.contiguous(memory_format(p.channels_last));
}

// Calls f(scalar_t{}, CL constant) for the problem's dtype and layout.
template <class F>
void dispatch_bn(const BnProblem& p, const char* op, F&& f) {
  dispatch_floating(p.y.scalar_type(), op, [&](auto tag) {
    dispatch_layout(p.channels_last, [&](auto cl_const) { f(tag, cl_const); });
  });
}

// Grid-stride launch of an elementwise kernel over the whole of y: calls
// launch(blocks, index_t{}), index_t int32_t when every index (and the last
// step past the end) fits.
template <class F>
void launch_elementwise(const BnProblem& p, F&& launch) {
  const int64_t numel = p.y.numel();
  const int64_t blocks = std::min<int64_t>(ceil_div(numel, kThreads), 1 << 16);
  if (numel + blocks * kThreads <= std::numeric_limits<int32_t>::max()) {
    launch(dim3(unsigned(blocks)), int32_t{});
  } else {
    launch(dim3(unsigned(blocks)), int64_t{});
  }
}

inline std::tuple<at::Tensor, at::Tensor> bn_silu_stats(const at::Tensor& y) {
  constexpr const char* op = "bn_silu_stats";
  const BnProblem p = bn_problem(op, y);
  DeviceScope scope(p.y);
  Chunks chunks;
  const PlaneGeom g = reduction_geometry(p, chunks);
  at::Tensor partials = bn_acc_buffer(p, {chunks.count, p.C, 3});
  at::Tensor mean = bn_acc_buffer(p, {p.C}), var = bn_acc_buffer(p, {p.C});
  dispatch_bn(p, op, [&](auto tag, auto cl_const) {
    using scalar_t = decltype(tag);
    using acc_t = acc_type<scalar_t>;
    auto* moments = reinterpret_cast<Moments<acc_t>*>(partials.mutable_data_ptr<acc_t>());
    auto stats = bn_stats_kernel<decltype(cl_const)::value, scalar_t, acc_t>;
    EFFNET_LAUNCH(stats, reduction_grid(p, chunks), dim3(kWarp, kRows), reduce_rows_smem<Moments<acc_t>>(),
                  p.y.const_data_ptr<scalar_t>(), g, moments);
    auto finalize = dw_finalize_stats_kernel<acc_t>;
    EFFNET_LAUNCH(finalize, dim3(unsigned(ceil_div(p.C, kWarp))), dim3(kWarp, kRows),
                  reduce_rows_smem<Moments<acc_t>>(), static_cast<const Moments<acc_t>*>(moments), chunks.count,
                  p.C, mean.mutable_data_ptr<acc_t>(), var.mutable_data_ptr<acc_t>());
  });
  return {mean, var};
}

inline at::Tensor bn_silu_forward(const at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift) {
  constexpr const char* op = "bn_silu_forward";
  const BnProblem p = bn_problem(op, y);
  DeviceScope scope(p.y);
  const at::Tensor a = channel_vector(scale, p.y, p.C, p.acc, op, "scale");
  const at::Tensor b = channel_vector(shift, p.y, p.C, p.acc, op, "shift");
  at::Tensor out = bn_output(p);
  dispatch_bn(p, op, [&](auto tag, auto cl_const) {
    using scalar_t = decltype(tag);
    using acc_t = acc_type<scalar_t>;
    launch_elementwise(p, [&](dim3 grid, auto index_tag) {
      using index_t = decltype(index_tag);
      auto kernel = bn_forward_kernel<decltype(cl_const)::value, index_t, scalar_t, acc_t>;
      EFFNET_LAUNCH(kernel, grid, dim3(kThreads), 0, p.y.const_data_ptr<scalar_t>(), a.const_data_ptr<acc_t>(),
                    b.const_data_ptr<acc_t>(), index_t(p.y.numel()), index_t(p.C), index_t(p.hw),
                    out.mutable_data_ptr<scalar_t>());
    });
  });
  return out;
}

inline std::tuple<at::Tensor, at::Tensor> bn_silu_backward_reduce(const at::Tensor& grad_out, const at::Tensor& y,
                                                                  const at::Tensor& scale, const at::Tensor& shift,
                                                                  const at::Tensor& mean) {
  constexpr const char* op = "bn_silu_backward_reduce";
  const BnProblem p = bn_problem(op, y);
  DeviceScope scope(p.y);
  const at::Tensor grad = grad_like_y(p, grad_out, op);
  const at::Tensor a = channel_vector(scale, p.y, p.C, p.acc, op, "scale");
  const at::Tensor b = channel_vector(shift, p.y, p.C, p.acc, op, "shift");
  const at::Tensor mu = channel_vector(mean, p.y, p.C, p.acc, op, "mean");
  Chunks chunks;
  const PlaneGeom g = reduction_geometry(p, chunks);
  at::Tensor partials = bn_acc_buffer(p, {chunks.count, p.C, 2});
  at::Tensor sum_dz = bn_acc_buffer(p, {p.C}), sum_dz_ymu = bn_acc_buffer(p, {p.C});
  dispatch_bn(p, op, [&](auto tag, auto cl_const) {
    using scalar_t = decltype(tag);
    using acc_t = acc_type<scalar_t>;
    auto kernel = bn_backward_reduce_kernel<decltype(cl_const)::value, scalar_t, acc_t>;
    const size_t smem = reduce_rows_smem<Sums<acc_t, 2>>();  // outside the macro: its comma
    EFFNET_LAUNCH(kernel, reduction_grid(p, chunks), dim3(kWarp, kRows), smem, grad.const_data_ptr<scalar_t>(),
                  p.y.const_data_ptr<scalar_t>(), a.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(),
                  mu.const_data_ptr<acc_t>(), g, partials.mutable_data_ptr<acc_t>());
    const acc_t* sums = partials.const_data_ptr<acc_t>();
    launch_sum_columns(sums, chunks.count, 2 * p.C, p.C, 2, sum_dz.mutable_data_ptr<acc_t>());
    launch_sum_columns(sums + 1, chunks.count, 2 * p.C, p.C, 2, sum_dz_ymu.mutable_data_ptr<acc_t>());
  });
  return {sum_dz, sum_dz_ymu};
}

inline at::Tensor bn_silu_backward(const at::Tensor& grad_out, const at::Tensor& y, const at::Tensor& scale,
                                   const at::Tensor& shift, const at::Tensor& coef_a, const at::Tensor& coef_b,
                                   const at::Tensor& coef_c) {
  constexpr const char* op = "bn_silu_backward";
  const BnProblem p = bn_problem(op, y);
  DeviceScope scope(p.y);
  const at::Tensor grad = grad_like_y(p, grad_out, op);
  const at::Tensor a = channel_vector(scale, p.y, p.C, p.acc, op, "scale");
  const at::Tensor b = channel_vector(shift, p.y, p.C, p.acc, op, "shift");
  const at::Tensor ca = channel_vector(coef_a, p.y, p.C, p.acc, op, "coef_a");
  const at::Tensor cb = channel_vector(coef_b, p.y, p.C, p.acc, op, "coef_b");
  const at::Tensor cc = channel_vector(coef_c, p.y, p.C, p.acc, op, "coef_c");
  at::Tensor grad_y = bn_output(p);
  dispatch_bn(p, op, [&](auto tag, auto cl_const) {
    using scalar_t = decltype(tag);
    using acc_t = acc_type<scalar_t>;
    launch_elementwise(p, [&](dim3 grid, auto index_tag) {
      using index_t = decltype(index_tag);
      auto kernel = bn_backward_kernel<decltype(cl_const)::value, index_t, scalar_t, acc_t>;
      EFFNET_LAUNCH(kernel, grid, dim3(kThreads), 0, grad.const_data_ptr<scalar_t>(), p.y.const_data_ptr<scalar_t>(),
                    a.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(), ca.const_data_ptr<acc_t>(),
                    cb.const_data_ptr<acc_t>(), cc.const_data_ptr<acc_t>(), index_t(p.y.numel()), index_t(p.C),
                    index_t(p.hw), grad_y.mutable_data_ptr<scalar_t>());
    });
  });
  return grad_y;
}

}  // namespace effnet_fast::cuda_backend
