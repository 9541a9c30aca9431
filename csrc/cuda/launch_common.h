// Host-side launch helpers shared by the CUDA build (nvcc) and the host
// emulation (EFFNET_FAST_EMU, csrc/emu): the op code in *_ops.h computes the
// same grids for both and only the launch itself differs.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/core/MemoryFormat.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>
#include <type_traits>

#ifdef EFFNET_FAST_EMU
#include "../emu/cuda_emu.h"
// Runs every block and thread of the grid on the host (see csrc/emu/cuda_emu.h).
#define EFFNET_LAUNCH(kernel, grid, block, smem, ...) ::cuda_emu::launch(kernel, grid, block, smem, __VA_ARGS__)
#else
#include <c10/cuda/CUDAStream.h>  // at::cuda::getCurrentCUDAStream (ATen/cuda/CUDAContext.h needs cuSPARSE headers)
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#define EFFNET_LAUNCH(kernel, grid, block, smem, ...)                                   \
  do {                                                                                  \
    kernel<<<grid, block, smem, at::cuda::getCurrentCUDAStream()>>>(__VA_ARGS__);       \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                                     \
  } while (0)
#endif

#include "device_common.cuh"

namespace effnet_fast::cuda_backend {

#ifdef EFFNET_FAST_EMU
constexpr const char* kBackend = "cuda_emu";
constexpr c10::DeviceType kDeviceType = c10::DeviceType::CPU;

// The emulation compiles the kernels for the dtypes the tests run on the host.
template <class F>
void dispatch_floating(at::ScalarType t, const char* op, F&& f) {
  switch (t) {
    case at::kFloat: return f(float{});
    case at::kDouble: return f(double{});
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", t, " for the emulated CUDA kernels (float32 or float64)");
  }
}

// Makes elements a kernel forgets to write stand out (NaN) in the tests.
inline void poison_output(at::Tensor& t) {
  t.fill_(std::numeric_limits<double>::quiet_NaN());
}

struct DeviceScope {
  explicit DeviceScope(const at::Tensor&) {}
};
#else
constexpr const char* kBackend = "cuda";
constexpr c10::DeviceType kDeviceType = c10::DeviceType::CUDA;

template <class F>
void dispatch_floating(at::ScalarType t, const char* op, F&& f) {
  switch (t) {
    case at::kFloat: return f(float{});
    case at::kHalf: return f(c10::Half{});
    case at::kBFloat16: return f(c10::BFloat16{});
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", t,
                  " for the CUDA kernels (float32, float16 or bfloat16; float64 runs on the cpu backend)");
  }
}

inline void poison_output(at::Tensor&) {}

struct DeviceScope {
  c10::cuda::OptionalCUDAGuard guard;
  explicit DeviceScope(const at::Tensor& t) : guard(t.device()) {}
};
#endif

template <class scalar_t>
using acc_type = at::opmath_type<scalar_t>;

inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// x is channels_last in memory (and not also plain contiguous, as for 1x1 planes).
inline bool is_channels_last(const at::Tensor& x) {
  return x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
}

inline at::MemoryFormat memory_format(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// x itself when contiguous or channels_last, else a contiguous copy.
inline at::Tensor supported_layout(const at::Tensor& x) {
  return x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast) ? x : x.contiguous();
}

inline void check_device(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(t.device().type() == kDeviceType, op, ": ", name, " must be a ", c10::DeviceTypeName(kDeviceType),
              " tensor for the ", kBackend, " backend, got one on ", t.device());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device());
}

// A (C,) per-channel vector as a contiguous tensor of dtype acc.
inline at::Tensor channel_vector(const at::Tensor& v, const at::Tensor& x, int64_t C, at::ScalarType acc,
                                 const char* op, const char* name) {
  check_device(v, x, op, name);
  TORCH_CHECK(v.dim() == 1 && v.size(0) == C, op, ": ", name, " must have shape (", C, "), got ", v.sizes());
  TORCH_CHECK(v.is_floating_point(), op, ": ", name, " must be floating point, got ", v.scalar_type());
  return v.to(acc).contiguous();
}

inline void check_grid_dim(int64_t v, int64_t limit, const char* op, const char* what) {
  TORCH_CHECK(v >= 1 && v <= limit, op, ": ", what, " (", v, ") exceeds the CUDA grid limit ", limit);
}

constexpr int64_t kMaxGridX = std::numeric_limits<int32_t>::max();
constexpr int64_t kMaxGridYZ = 65535;

// Splits `count` positions into at most max_chunks chunks of about `target` positions.
struct Chunks {
  int64_t len, count;
};

inline Chunks split_chunks(int64_t count, int64_t target, int64_t max_chunks) {
  const int64_t chunks = std::min(std::max<int64_t>(ceil_div(count, target), 1), max_chunks);
  const int64_t len = ceil_div(count, chunks);
  return {len, ceil_div(count, len)};
}

// Calls f(std::integral_constant<int, K>) for K in {3, 5}.
template <class F>
void dispatch_kernel_size(int64_t k, F&& f) {
  if (k == 3) return f(std::integral_constant<int, 3>{});
  if (k == 5) return f(std::integral_constant<int, 5>{});
  TORCH_CHECK(false, "unsupported kernel size ", k, " (3 or 5)");
}

// Calls f(std::bool_constant<CL>).
template <class F>
void dispatch_layout(bool channels_last, F&& f) {
  if (channels_last) return f(std::true_type{});
  return f(std::false_type{});
}

}  // namespace effnet_fast::cuda_backend
