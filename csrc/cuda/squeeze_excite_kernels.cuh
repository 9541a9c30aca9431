// Kernels of squeeze-excitation: per-(n, c) plane sums (se_pool, se_gate_grad)
// and the channel-wise scale (se_scale).
#pragma once

#include "device_common.cuh"

namespace effnet_fast::cuda_backend {

template <bool PRODUCT, class scalar_t, class acc_t>
__device__ __forceinline__ acc_t plane_term(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g,
                                            int64_t i) {
  return PRODUCT ? static_cast<acc_t>(g[i]) * static_cast<acc_t>(x[i]) : static_cast<acc_t>(x[i]);
}

// Stores or (several chunks per plane) atomically adds a plane's partial sum.
template <class acc_t>
__device__ __forceinline__ void emit_plane_sum(acc_t* __restrict__ out, int64_t idx, acc_t value, bool accumulate) {
  if (accumulate) {
    atomicAdd(out + idx, value);
  } else {
    out[idx] = value;
  }
}

// NCHW: each warp (row) sums chunk blockIdx.y of one contiguous plane
// (blockIdx.x * kRows + threadIdx.y); out[plane] gets sum / divisor.
// PRODUCT sums g * x (se_gate_grad), else x (se_pool).
template <bool PRODUCT, class scalar_t, class acc_t>
__global__ void __launch_bounds__(kThreads)
    plane_sums_nchw_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g, int64_t planes,
                           int64_t hw, int64_t chunk_len, acc_t divisor, bool accumulate, acc_t* __restrict__ out) {
  const int64_t plane = int64_t(blockIdx.x) * kRows + threadIdx.y;
  const int64_t start = int64_t(blockIdx.y) * chunk_len;
  const int64_t end = start + chunk_len < hw ? start + chunk_len : hw;
  acc_t s = 0;
  if (plane < planes) {
    const int64_t base = plane * hw;
    for (int64_t i = start + threadIdx.x; i < end; i += kWarp) s += plane_term<PRODUCT, scalar_t, acc_t>(x, g, base + i);
  }
  // The whole warp shares `plane`, so it reduces together.
  Sums<acc_t, 1> total = warp_reduce(Sums<acc_t, 1>{{s}});
  if (threadIdx.x == 0 && plane < planes) emit_plane_sum(out, plane, total.v[0] / divisor, accumulate);
}

// NHWC: lanes take 32 adjacent channels of image blockIdx.z, rows stride over
// the pixels of chunk blockIdx.y; out[n * C + c] gets sum / divisor.
template <bool PRODUCT, class scalar_t, class acc_t>
__global__ void __launch_bounds__(kThreads)
    plane_sums_nhwc_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g, int64_t C, int64_t hw,
                           int64_t chunk_len, acc_t divisor, bool accumulate, acc_t* __restrict__ out) {
  const int64_t c = int64_t(blockIdx.x) * kWarp + threadIdx.x;
  const int64_t n = blockIdx.z;
  const int64_t start = int64_t(blockIdx.y) * chunk_len;
  const int64_t end = start + chunk_len < hw ? start + chunk_len : hw;
  Sums<acc_t, 1> s{{acc_t(0)}};
  if (c < C) {
    for (int64_t p = start + threadIdx.y; p < end; p += kRows) {
      s.v[0] += plane_term<PRODUCT, scalar_t, acc_t>(x, g, (n * hw + p) * C + c);
    }
  }
  EFFNET_DYNAMIC_SHARED(smem);
  s = reduce_rows(s, reinterpret_cast<Sums<acc_t, 1>*>(smem));
  if (threadIdx.y == 0 && c < C) emit_plane_sum(out, n * C + c, s.v[0] / divisor, accumulate);
}

// out = x * gate[n, c] (+ bias[n, c]) over all elements (grid-stride, 1-D blocks);
// index_t is int32_t when every index fits.
template <bool CL, class index_t, class scalar_t, class acc_t>
__global__ void __launch_bounds__(kThreads)
    se_scale_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ gate, const acc_t* __restrict__ bias,
                    index_t numel, index_t C, index_t hw, scalar_t* __restrict__ out) {
  const index_t step = index_t(gridDim.x) * blockDim.x;
  for (index_t i = index_t(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += step) {
    const index_t nc = CL ? i / (hw * C) * C + i % C : i / hw;
    acc_t v = static_cast<acc_t>(x[i]) * gate[nc];
    if (bias != nullptr) v += bias[nc];
    out[i] = static_cast<scalar_t>(v);
  }
}

}  // namespace effnet_fast::cuda_backend
