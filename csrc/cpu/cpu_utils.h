// Shared pieces of the CPU kernels: input validation, layouts, vector loads and
// stores that widen to the accumulation type, and SiLU / sigmoid.
#pragma once

// at::vec::Vectorized picks its instruction set from CPU_CAPABILITY_* (ATen sets
// them for its own per-ISA builds). The extension is built for the host ISA
// (-march=native), so choose the widest one the compiler targets; without this
// Vectorized falls back to scalar loops.
#if !defined(CPU_CAPABILITY)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#else
#define CPU_CAPABILITY DEFAULT
#endif
#endif

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>

namespace effnet_fast::cpu {

using at::vec::Vectorized;

// Dispatch over the input dtypes; inside, scalar_t is the storage type and
// acc_t (float, or double for double inputs) the accumulation type.
#define EFFNET_DISPATCH(TYPE, NAME, ...)                                              \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, [&] {        \
    using acc_t = at::opmath_type<scalar_t>;                                          \
    __VA_ARGS__();                                                                    \
  })

// For the per-pixel helpers of the inner loops: a call there costs more than the work.
#define EFFNET_ALWAYS_INLINE inline __attribute__((always_inline))

enum class Layout { NCHW, NHWC };

inline at::MemoryFormat memory_format(Layout layout) {
  return layout == Layout::NHWC ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

inline int64_t round_up(int64_t value, int64_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

// A tensor that is both contiguous and channels_last (C == 1 or H * W == 1)
// counts as contiguous, as in effnet_fast.ops.common.memory_format_of.
inline Layout layout_of(const at::Tensor& x, const char* op) {
  if (x.is_contiguous()) return Layout::NCHW;
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast), op,
              ": x must be contiguous (NCHW) or channels_last, got sizes ", x.sizes(), " and strides ",
              x.strides());
  return Layout::NHWC;
}

inline void check_input(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), op, ": the CPU kernels need CPU tensors, got x on ", x.device());
  TORCH_CHECK(x.dim() == 4, op, ": expected a 4-D (N, C, H, W) input, got shape ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": unsupported dtype ", x.scalar_type(),
              "; supported: float32, float64, bfloat16, float16");
  TORCH_CHECK(x.numel() > 0, op, ": empty input of shape ", x.sizes());
}

// `other` brought to x's layout after checking it matches x in shape, dtype and device.
inline at::Tensor like_input(const at::Tensor& other, const at::Tensor& x, at::IntArrayRef sizes, Layout layout,
                             const char* op, const char* name) {
  TORCH_CHECK(other.device() == x.device(), op, ": ", name, " is on ", other.device(), ", x on ", x.device());
  TORCH_CHECK(other.scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ", other.scalar_type(),
              ", x has ", x.scalar_type());
  TORCH_CHECK(other.sizes() == sizes, op, ": ", name, " must have shape ", sizes, ", got ", other.sizes());
  return other.contiguous(memory_format(layout));
}

// A per-channel (or per-(n, c)) vector checked for shape and device, as a
// contiguous tensor of the accumulation dtype.
inline at::Tensor acc_vector(const at::Tensor& v, at::IntArrayRef sizes, at::ScalarType acc, const char* op,
                             const char* name) {
  TORCH_CHECK(v.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got one on ", v.device());
  TORCH_CHECK(v.sizes() == sizes, op, ": ", name, " must have shape ", sizes, ", got ", v.sizes());
  TORCH_CHECK(at::isFloatingType(v.scalar_type()), op, ": ", name, " must be floating point, got ",
              v.scalar_type());
  return v.to(acc).contiguous();
}

inline at::ScalarType acc_type_of(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Loads `count` (<= lanes) values of scalar_t widened to acc_t; the rest are zero.
template <typename acc_t, typename scalar_t>
inline Vectorized<acc_t> load_acc(const scalar_t* p, int64_t count = Vectorized<acc_t>::size()) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return Vectorized<acc_t>::loadu(p, count);
  } else {
    static_assert(std::is_same_v<acc_t, float>);
    auto wide = at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(p, count));
    return std::get<0>(wide);
  }
}

// Stores the first `count` lanes of v narrowed to scalar_t.
template <typename scalar_t, typename acc_t>
inline void store_acc(scalar_t* p, const Vectorized<acc_t>& v, int64_t count = Vectorized<acc_t>::size()) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    v.store(p, count);
  } else {
    at::vec::convert_from_float<scalar_t>(v, v).store(p, count);
  }
}

// The SiLU helpers below are forced inline: a call per vector in the kernels'
// inner loops costs more than the math and spills the caller's registers.

// exp for sigmoid: float uses ATen's inlined polynomial (about 1e-6 relative
// error), which keeps the caller's registers alive across it; double keeps Sleef.
template <typename T>
EFFNET_ALWAYS_INLINE Vectorized<T> exp_for_sigmoid(const Vectorized<T>& v) {
  if constexpr (std::is_same_v<T, float>) {
    return v.exp_u20();
  } else {
    return v.exp();
  }
}

// 1 / d for d >= 1: float uses the reciprocal estimate refined by one Newton
// step (a few ulp) instead of a division, which is slow on wide vectors.
template <typename T>
EFFNET_ALWAYS_INLINE Vectorized<T> reciprocal(const Vectorized<T>& d) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    const __m512 r = _mm512_rcp14_ps(d);
    return _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.f)));
  }
#endif
  return Vectorized<T>(T(1)) / d;
}

// exp(-z) is clamped at exp(80) so that 1 + exp(-z) stays finite (the fast exp
// and reciprocal give NaN on infinity); sigmoid(-80) is 2e-35 either way.
template <typename T>
EFFNET_ALWAYS_INLINE Vectorized<T> sigmoid(const Vectorized<T>& z) {
  const Vectorized<T> neg_z = at::vec::minimum(z.neg(), Vectorized<T>(T(80)));
  return reciprocal(Vectorized<T>(T(1)) + exp_for_sigmoid(neg_z));
}

// NaN at z = -inf, as torch gives (the clamp in sigmoid would make it -inf).
template <typename T>
EFFNET_ALWAYS_INLINE Vectorized<T> nan_at_minus_inf(const Vectorized<T>& v, const Vectorized<T>& z) {
  const Vectorized<T> minus_inf(-std::numeric_limits<T>::infinity());
  return Vectorized<T>::blendv(v, Vectorized<T>(std::numeric_limits<T>::quiet_NaN()), z == minus_inf);
}

template <typename T>
EFFNET_ALWAYS_INLINE Vectorized<T> silu(const Vectorized<T>& z) {
  return nan_at_minus_inf(z * sigmoid(z), z);
}

// d silu(z) / dz = s * (1 + z * (1 - s)) with s = sigmoid(z).
template <typename T>
EFFNET_ALWAYS_INLINE Vectorized<T> silu_grad(const Vectorized<T>& z) {
  const Vectorized<T> one(T(1));
  const Vectorized<T> s = sigmoid(z);
  return nan_at_minus_inf(s * at::vec::fmadd(z, one - s, one), z);
}

// Sum of the lanes, in double.
template <typename T>
inline double lane_sum(const Vectorized<T>& v) {
  __at_align__ T lanes[Vectorized<T>::size()];
  v.store(lanes);
  double total = 0;
  for (int64_t i = 0; i < Vectorized<T>::size(); ++i) total += lanes[i];
  return total;
}

// Mean and sum of squared deviations, merged with Chan's formula.
struct MeanM2 {
  double count = 0, mean = 0, m2 = 0;
  void merge(double n_b, double mean_b, double m2_b) {
    if (n_b == 0) return;
    const double total = count + n_b, delta = mean_b - mean;
    mean += delta * n_b / total;
    m2 += m2_b + delta * delta * count * n_b / total;
    count = total;
  }
};

// Zeroes the lanes from `count` on.
template <typename T>
inline Vectorized<T> keep_lanes(const Vectorized<T>& v, int64_t count) {
  return count >= Vectorized<T>::size() ? v : Vectorized<T>::set(Vectorized<T>(T(0)), v, count);
}

}  // namespace effnet_fast::cpu
