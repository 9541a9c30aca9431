// Kernels of BatchNorm + SiLU on a tensor y (N, C, H, W), NCHW or channels_last.
//
// The reductions (statistics, backward sums) use the thread mapping of the
// depthwise kernels (owned_positions / for_each_owned): one channel per block
// (NCHW) or per lane (channels_last), grid.y = chunk of the N * H * W positions.
// Each block writes one partial per (chunk, channel); a second kernel merges the
// partials in a fixed order, so results do not depend on scheduling.
// The elementwise passes are grid-stride loops over y's storage order.
#pragma once

#include "dwconv_bn_silu_kernels.cuh"

namespace effnet_fast::cuda_backend {

struct PlaneGeom {
  int64_t C;
  int hw;             // H * W, < 2^31 (checked on the host)
  int64_t count;      // N * H * W positions
  int64_t chunk_len;  // positions per grid.y chunk
  double inv_plane;   // 1.0 / hw
};

// Per-chunk Moments of y for each channel: partials[chunk * C + c].
template <bool CL, class scalar_t, class acc_t>
__global__ void __launch_bounds__(kThreads)
    bn_stats_kernel(const scalar_t* __restrict__ y, PlaneGeom g, Moments<acc_t>* __restrict__ partials) {
  const Ownership o = owned_positions<CL>(g.C, g.count, g.chunk_len);
  ShiftedSums<acc_t> acc;
  for_each_owned<CL>(o, g.C, 1, g.hw, g.inv_plane,
                     [&](int64_t, int, int, int64_t off) { acc.add(static_cast<acc_t>(y[off])); });
  Moments<acc_t> m = acc.moments();
  if (!CL) m = warp_reduce(m);
  EFFNET_DYNAMIC_SHARED(smem);
  m = reduce_rows(m, reinterpret_cast<Moments<acc_t>*>(smem));
  if (threadIdx.y == 0 && o.active && (CL || threadIdx.x == 0)) partials[int64_t(blockIdx.y) * g.C + o.c] = m;
}

// Per-chunk (sum dz, sum dz * (y - mean)) per channel, dz = grad * silu'(y * scale + shift):
// partials[(chunk * C + c) * 2 + {0, 1}].
template <bool CL, class scalar_t, class acc_t>
__global__ void __launch_bounds__(kThreads)
    bn_backward_reduce_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ y,
                              const acc_t* __restrict__ scale, const acc_t* __restrict__ shift,
                              const acc_t* __restrict__ mean, PlaneGeom g, acc_t* __restrict__ partials) {
  const Ownership o = owned_positions<CL>(g.C, g.count, g.chunk_len);
  const acc_t a = o.active ? scale[o.c] : acc_t(0), b = o.active ? shift[o.c] : acc_t(0);
  const acc_t mu = o.active ? mean[o.c] : acc_t(0);
  Sums<acc_t, 2> s{{acc_t(0), acc_t(0)}};
  for_each_owned<CL>(o, g.C, 1, g.hw, g.inv_plane, [&](int64_t, int, int, int64_t off) {
    const acc_t v = static_cast<acc_t>(y[off]);
    const acc_t dz = static_cast<acc_t>(grad_out[off]) * silu_grad(v * a + b);
    s.v[0] += dz;
    s.v[1] += dz * (v - mu);
  });
  if (!CL) s = warp_reduce(s);
  EFFNET_DYNAMIC_SHARED(smem);
  s = reduce_rows(s, reinterpret_cast<Sums<acc_t, 2>*>(smem));
  if (threadIdx.y == 0 && o.active && (CL || threadIdx.x == 0)) {
    acc_t* dst = partials + (int64_t(blockIdx.y) * g.C + o.c) * 2;
    dst[0] = s.v[0];
    dst[1] = s.v[1];
  }
}

// Channel of element i in storage order.
template <bool CL, class index_t>
__device__ __forceinline__ index_t channel_of(index_t i, index_t C, index_t hw) {
  return CL ? i % C : (i / hw) % C;
}

// out = silu(y * scale[c] + shift[c]) over all elements (grid-stride, 1-D blocks);
// index_t is int32_t when every index fits.
template <bool CL, class index_t, class scalar_t, class acc_t>
__global__ void __launch_bounds__(kThreads)
    bn_forward_kernel(const scalar_t* __restrict__ y, const acc_t* __restrict__ scale,
                      const acc_t* __restrict__ shift, index_t numel, index_t C, index_t hw,
                      scalar_t* __restrict__ out) {
  const index_t step = index_t(gridDim.x) * blockDim.x;
  for (index_t i = index_t(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += step) {
    const index_t c = channel_of<CL>(i, C, hw);
    out[i] = static_cast<scalar_t>(silu(static_cast<acc_t>(y[i]) * scale[c] + shift[c]));
  }
}

// grad_y = coef_a * dz + coef_b * y + coef_c, dz = grad * silu'(y * scale + shift).
template <bool CL, class index_t, class scalar_t, class acc_t>
__global__ void __launch_bounds__(kThreads)
    bn_backward_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ y,
                       const acc_t* __restrict__ scale, const acc_t* __restrict__ shift,
                       const acc_t* __restrict__ coef_a, const acc_t* __restrict__ coef_b,
                       const acc_t* __restrict__ coef_c, index_t numel, index_t C, index_t hw,
                       scalar_t* __restrict__ grad_y) {
  const index_t step = index_t(gridDim.x) * blockDim.x;
  for (index_t i = index_t(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += step) {
    const index_t c = channel_of<CL>(i, C, hw);
    const acc_t v = static_cast<acc_t>(y[i]);
    const acc_t dz = static_cast<acc_t>(grad_out[i]) * silu_grad(v * scale[c] + shift[c]);
    grad_y[i] = static_cast<scalar_t>(coef_a[c] * dz + coef_b[c] * v + coef_c[c]);
  }
}

}  // namespace effnet_fast::cuda_backend
