// Device code shared by the CUDA kernels: block shape, math helpers and the
// block-level reductions. Readable by nvcc and, through csrc/emu/cuda_emu.h,
// by a host compiler (EFFNET_FAST_EMU), so the same kernels run emulated.
#pragma once

#include <cstdint>

#ifdef EFFNET_FAST_EMU
#include "../emu/cuda_emu.h"
// Dynamic shared memory only: the emulator allocates and poisons it per block.
#define EFFNET_DYNAMIC_SHARED(name) unsigned char* name = ::cuda_emu::dynamic_shared_memory()
#else
#include <cuda_runtime.h>
#define EFFNET_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace effnet_fast::cuda_backend {

// Every 2-D kernel runs blocks of kWarp x kRows threads: threadIdx.x is the lane
// of a warp, threadIdx.y the warp (row) index.
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarp = 32;
constexpr int kRows = 8;
constexpr int kThreads = kWarp * kRows;

__device__ __forceinline__ float exp_acc(float v) { return expf(v); }
__device__ __forceinline__ double exp_acc(double v) { return exp(v); }

template <class T>
__device__ __forceinline__ T sigmoid(T z) {
  return T(1) / (T(1) + exp_acc(-z));
}

template <class T>
__device__ __forceinline__ T silu(T z) {
  return z * sigmoid(z);
}

// d silu(z) / dz.
template <class T>
__device__ __forceinline__ T silu_grad(T z) {
  const T s = sigmoid(z);
  return s * (T(1) + z * (T(1) - s));
}

// Count, mean and sum of squared deviations of a set of values; two sets merge
// with Chan's formula, which avoids the cancellation of sum(y^2) - sum(y)^2 / n.
template <class T>
struct Moments {
  T n, mean, m2;
};

template <class T>
__device__ __forceinline__ Moments<T> combine(const Moments<T>& a, const Moments<T>& b) {
  const T n = a.n + b.n;
  if (n == T(0)) return a;
  const T delta = b.mean - a.mean;
  const T fb = b.n / n;
  return {n, a.mean + delta * fb, a.m2 + b.m2 + delta * delta * a.n * fb};
}

template <class T>
__device__ __forceinline__ Moments<T> shfl_down(const Moments<T>& v, int delta) {
  return {__shfl_down_sync(kFullMask, v.n, delta), __shfl_down_sync(kFullMask, v.mean, delta),
          __shfl_down_sync(kFullMask, v.m2, delta)};
}

// Per-thread accumulation of values relative to the thread's first value, so a
// large common offset does not cancel; converted to Moments for merging.
template <class T>
struct ShiftedSums {
  T shift = 0, n = 0, s = 0, sq = 0;

  __device__ __forceinline__ void add(T y) {
    if (n == T(0)) shift = y;
    const T d = y - shift;
    n += T(1);
    s += d;
    sq += d * d;
  }

  __device__ __forceinline__ Moments<T> moments() const {
    if (n == T(0)) return {T(0), T(0), T(0)};
    const T mean_d = s / n;
    const T m2 = sq - s * mean_d;
    return {n, shift + mean_d, m2 > T(0) ? m2 : T(0)};
  }
};

// V running sums reduced together.
template <class T, int V>
struct Sums {
  T v[V];
};

template <class T, int V>
__device__ __forceinline__ Sums<T, V> combine(const Sums<T, V>& a, const Sums<T, V>& b) {
  Sums<T, V> r;
#pragma unroll
  for (int i = 0; i < V; ++i) r.v[i] = a.v[i] + b.v[i];
  return r;
}

template <class T, int V>
__device__ __forceinline__ Sums<T, V> shfl_down(const Sums<T, V>& s, int delta) {
  Sums<T, V> r;
#pragma unroll
  for (int i = 0; i < V; ++i) r.v[i] = __shfl_down_sync(kFullMask, s.v[i], delta);
  return r;
}

// Reduces over the 32 lanes of a warp; the result is in lane 0.
template <class R>
__device__ __forceinline__ R warp_reduce(R v) {
#pragma unroll
  for (int delta = kWarp / 2; delta > 0; delta /= 2) v = combine(v, shfl_down(v, delta));
  return v;
}

// Reduces over threadIdx.y (blockDim.y a power of two) for each threadIdx.x;
// the result is in row 0. smem holds blockDim.y / 2 * kWarp values of R.
// Every thread of the block must call it.
template <class R>
__device__ __forceinline__ R reduce_rows(R v, R* smem) {
  const int tx = threadIdx.x, ty = threadIdx.y;
  for (int half = blockDim.y / 2; half > 0; half /= 2) {
    if (ty >= half && ty < 2 * half) smem[(ty - half) * kWarp + tx] = v;
    __syncthreads();
    if (ty < half) v = combine(v, smem[ty * kWarp + tx]);
    __syncthreads();
  }
  return v;
}

// Shared memory bytes reduce_rows needs for a block of kRows rows.
template <class R>
constexpr size_t reduce_rows_smem() {
  return sizeof(R) * (kRows / 2) * kWarp;
}

}  // namespace effnet_fast::cuda_backend
