// The se_* ops (csrc/op_schemas.h) on top of squeeze_excite_kernels.cuh. Included by
// squeeze_excite.cu (CUDA) and by csrc/emu (host emulation).
#pragma once

#include <optional>

#include "launch_common.h"
#include "squeeze_excite_kernels.cuh"

namespace effnet_fast::cuda_backend {

inline at::Tensor se_input(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() == 4, op, ": expected x of shape (N, C, H, W), got ", x.sizes());
  check_device(x, x, op, "x");
  TORCH_CHECK(x.numel() > 0, op, ": x is empty, shape ", x.sizes());
  return supported_layout(x);
}

// (N, C) sums over H, W of x (or grad * x when grad is given), divided by divisor.
inline at::Tensor plane_sums(const at::Tensor& x, const std::optional<at::Tensor>& grad, double divisor,
                             const char* op) {
  DeviceScope scope(x);
  const int64_t N = x.size(0), C = x.size(1), hw = x.size(2) * x.size(3);
  const bool cl = is_channels_last(x);
  const at::ScalarType acc = acc_dtype(x.scalar_type());
  // Planes split over several blocks add their partial sums atomically.
  const Chunks chunks = cl ? split_chunks(hw, kRows * 32, kMaxGridYZ) : split_chunks(hw, kWarp * 16, kMaxGridYZ);
  const bool accumulate = chunks.count > 1;
  at::Tensor out = accumulate ? at::zeros({N, C}, x.options().dtype(acc)) : at::empty({N, C}, x.options().dtype(acc));
  if (!accumulate) poison_output(out);
  if (cl) check_grid_dim(N, kMaxGridYZ, op, "batch size");
  const dim3 grid = cl ? dim3(unsigned(ceil_div(C, kWarp)), unsigned(chunks.count), unsigned(N))
                       : dim3(unsigned(ceil_div(N * C, kRows)), unsigned(chunks.count));
  if (!cl) check_grid_dim(ceil_div(N * C, kRows), kMaxGridX, op, "planes / 8");
  dispatch_floating(x.scalar_type(), op, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad ? grad->const_data_ptr<scalar_t>() : nullptr;
    acc_t* outp = out.mutable_data_ptr<acc_t>();
    auto launch = [&](auto product) {
      constexpr bool PRODUCT = decltype(product)::value;
      if (cl) {
        auto kernel = plane_sums_nhwc_kernel<PRODUCT, scalar_t, acc_t>;
        const size_t smem = reduce_rows_smem<Sums<acc_t, 1>>();  // outside the macro: its comma
        EFFNET_LAUNCH(kernel, grid, dim3(kWarp, kRows), smem, xp, gp, C, hw,
                      chunks.len, acc_t(divisor), accumulate, outp);
      } else {
        auto kernel = plane_sums_nchw_kernel<PRODUCT, scalar_t, acc_t>;
        EFFNET_LAUNCH(kernel, grid, dim3(kWarp, kRows), 0, xp, gp, N * C, hw, chunks.len, acc_t(divisor),
                      accumulate, outp);
      }
    };
    if (grad) {
      launch(std::true_type{});
    } else {
      launch(std::false_type{});
    }
  });
  return out;
}

inline at::Tensor se_pool(const at::Tensor& x_in) {
  constexpr const char* op = "se_pool";
  const at::Tensor x = se_input(x_in, op);
  return plane_sums(x, std::nullopt, double(x.size(2) * x.size(3)), op);
}

inline at::Tensor se_gate_grad(const at::Tensor& grad_out, const at::Tensor& x_in) {
  constexpr const char* op = "se_gate_grad";
  const at::Tensor x = se_input(x_in, op);
  check_device(grad_out, x, op, "grad_out");
  TORCH_CHECK(grad_out.sizes() == x.sizes(), op, ": grad_out has shape ", grad_out.sizes(), " but x has shape ",
              x.sizes());
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), op, ": grad_out dtype ", grad_out.scalar_type(),
              " differs from x dtype ", x.scalar_type());
  const at::Tensor grad = grad_out.contiguous(memory_format(is_channels_last(x)));
  return plane_sums(x, grad, 1.0, op);
}

// A (N, C) gate or bias as a contiguous tensor of dtype acc.
inline at::Tensor nc_vector(const at::Tensor& v, const at::Tensor& x, at::ScalarType acc, const char* op,
                            const char* name) {
  check_device(v, x, op, name);
  TORCH_CHECK(v.dim() == 2 && v.size(0) == x.size(0) && v.size(1) == x.size(1), op, ": ", name,
              " must have shape (", x.size(0), ", ", x.size(1), "), got ", v.sizes());
  TORCH_CHECK(v.is_floating_point(), op, ": ", name, " must be floating point, got ", v.scalar_type());
  return v.to(acc).contiguous();
}

inline at::Tensor se_scale(const at::Tensor& x_in, const at::Tensor& gate, const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "se_scale";
  const at::Tensor x = se_input(x_in, op);
  DeviceScope scope(x);
  const at::ScalarType acc = acc_dtype(x.scalar_type());
  const at::Tensor g = nc_vector(gate, x, acc, op, "gate");
  const std::optional<at::Tensor> b =
      bias ? std::optional<at::Tensor>(nc_vector(*bias, x, acc, op, "bias")) : std::nullopt;
  const bool cl = is_channels_last(x);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(memory_format(cl)));
  poison_output(out);
  const int64_t numel = x.numel(), C = x.size(1), hw = x.size(2) * x.size(3);
  const int64_t blocks = std::min<int64_t>(ceil_div(numel, kThreads), 1 << 16);
  const bool use_int32 = numel + blocks * kThreads <= std::numeric_limits<int32_t>::max();
  dispatch_floating(x.scalar_type(), op, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_type<scalar_t>;
    const acc_t* bp = b ? b->const_data_ptr<acc_t>() : nullptr;
    auto launch = [&](auto index_tag, auto cl_const) {
      using index_t = decltype(index_tag);
      auto kernel = se_scale_kernel<decltype(cl_const)::value, index_t, scalar_t, acc_t>;
      EFFNET_LAUNCH(kernel, dim3(unsigned(blocks)), dim3(kThreads), 0, x.const_data_ptr<scalar_t>(),
                    g.const_data_ptr<acc_t>(), bp, index_t(numel), index_t(C), index_t(hw),
                    out.mutable_data_ptr<scalar_t>());
    };
    dispatch_layout(cl, [&](auto cl_const) {
      if (use_int32) {
        launch(int32_t{}, cl_const);
      } else {
        launch(int64_t{}, cl_const);
      }
    });
  });
  return out;
}

}  // namespace effnet_fast::cuda_backend
