// Kernels of depthwise conv (k x k, zero padding pad_h above and pad_w left of the input;
// the bottom and right padding only shows in OH and OW) + BatchNorm + SiLU.
//
// Thread mapping (blocks of kWarp x kRows threads, grid.y = chunk of positions):
//   NCHW (CL = false): one channel per block (blockIdx.x); the block's 256 threads
//     stride over the chunk's (n, h, w) positions, adjacent threads on adjacent w.
//   NHWC (CL = true): one channel per lane (blockIdx.x * 32 + threadIdx.x), so a
//     warp reads 32 adjacent channels; the rows stride over the chunk's positions.
// Per-channel reductions write one partial per (chunk, channel); a second kernel
// merges the partials, so results do not depend on scheduling.
#pragma once

#include "device_common.cuh"

namespace effnet_fast::cuda_backend {

struct ConvGeom {
  int64_t N, C;
  int H, W, OH, OW;
  int stride, pad_h, pad_w;
  int64_t chunk_len;  // positions per grid.y chunk
  double inv_plane;   // 1.0 / (rows * cols) of the positions iterated
};

template <bool CL>
__device__ __forceinline__ int64_t element_offset(int64_t n, int64_t c, int h, int w, int64_t C, int H, int W) {
  return CL ? ((n * H + h) * W + w) * C + c : ((n * C + c) * H + h) * W + w;
}

// The channel and the positions [first, end) (step `step`) of a chunk of
// `count` = N * rows * cols positions that this thread owns.
struct Ownership {
  int64_t c, first, end;
  int step;
  bool active;
};

template <bool CL>
__device__ __forceinline__ Ownership owned_positions(int64_t C, int64_t count, int64_t chunk_len) {
  const int64_t start = int64_t(blockIdx.y) * chunk_len;
  const int64_t end = start + chunk_len < count ? start + chunk_len : count;
  Ownership o;
  if (CL) {
    o = {int64_t(blockIdx.x) * kWarp + threadIdx.x, start + threadIdx.y, end, kRows, false};
  } else {
    o = {int64_t(blockIdx.x), start + threadIdx.y * kWarp + threadIdx.x, end, kThreads, false};
  }
  o.active = o.c < C;
  return o;
}

// Calls f(n, h, w, offset) for each owned position of a (N, C, rows, cols) tensor
// in the layout CL; offset is the element's index in that tensor; inv_plane is
// 1.0 / (rows * cols). Positions advance by mixed-radix addition of the step,
// so the loop has no division.
template <bool CL, class F>
__device__ __forceinline__ void for_each_owned(const Ownership& o, int64_t C, int rows, int cols, double inv_plane,
                                               F&& f) {
  if (!o.active || o.first >= o.end) return;
  const int plane = rows * cols;  // < 2^31, checked on the host
  // n = first / plane through the host's 1 / plane (a 64-bit integer division
  // would be a called subroutine, with a stack frame); the estimate is off by
  // at most one.
  int64_t n = int64_t(double(o.first) * inv_plane);
  int64_t rest = o.first - n * plane;
  if (rest < 0) {
    --n;
    rest += plane;
  } else if (rest >= plane) {
    ++n;
    rest -= plane;
  }
  const int r = int(rest);
  int h = r / cols, w = r - h * cols;
  const int step_n = o.step / plane;
  const int step_r = o.step - step_n * plane;
  const int step_h = step_r / cols, step_w = step_r - step_h * cols;
  for (int64_t e = o.first; e < o.end; e += o.step) {
    f(n, h, w, CL ? e * C + o.c : (n * C + o.c) * plane + (int64_t(h) * cols + w));
    w += step_w;
    h += step_h;
    n += step_n;
    if (w >= cols) {
      w -= cols;
      ++h;
    }
    if (h >= rows) {
      h -= rows;
      ++n;
    }
  }
}

template <int K, class scalar_t, class acc_t>
__device__ __forceinline__ void load_filter(const scalar_t* __restrict__ weight, const Ownership& o, acc_t (&w)[K * K]) {
#pragma unroll
  for (int i = 0; i < K * K; ++i) w[i] = o.active ? static_cast<acc_t>(weight[o.c * K * K + i]) : acc_t(0);
}

// y = dwconv(x)[n, c, oh, ow]; win receives the K x K input window (0 outside).
// Addresses are a 64-bit row pointer plus 32-bit column offsets (W * C < 2^31,
// checked on the host), which keeps register pressure down.
template <int K, bool CL, class scalar_t, class acc_t>
__device__ __forceinline__ acc_t conv_at(const scalar_t* __restrict__ x, const ConvGeom& g, int64_t n, int64_t c,
                                         int oh, int ow, const acc_t (&w)[K * K], acc_t (&win)[K * K]) {
  const scalar_t* plane = x + element_offset<CL>(n, c, 0, 0, g.C, g.H, g.W);
  const int64_t row_stride = CL ? int64_t(g.W) * g.C : g.W;
  const int col_stride = CL ? int(g.C) : 1;
  const int ih0 = oh * g.stride - g.pad_h, iw0 = ow * g.stride - g.pad_w;
  acc_t y = 0;
#pragma unroll
  for (int i = 0; i < K; ++i) {
    const int ih = ih0 + i;
    const bool row_in = unsigned(ih) < unsigned(g.H);
    const scalar_t* row = plane + (row_in ? ih : 0) * row_stride;
#pragma unroll
    for (int j = 0; j < K; ++j) {
      const int iw = iw0 + j;
      const bool in = row_in && unsigned(iw) < unsigned(g.W);
      const acc_t v = in ? static_cast<acc_t>(row[iw * col_stride]) : acc_t(0);
      win[i * K + j] = v;
      y += v * w[i * K + j];
    }
  }
  return y;
}

// Per-chunk Moments of y = dwconv(x) for each channel: partials[chunk * C + c].
template <int K, bool CL, class scalar_t, class acc_t>
__global__ void __launch_bounds__(kThreads, 1)
    dw_stats_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ weight, ConvGeom g,
                    Moments<acc_t>* __restrict__ partials) {
  const Ownership o = owned_positions<CL>(g.C, g.N * g.OH * g.OW, g.chunk_len);
  acc_t w[K * K], win[K * K];
  load_filter<K>(weight, o, w);
  ShiftedSums<acc_t> acc;
  for_each_owned<CL>(o, g.C, g.OH, g.OW, g.inv_plane, [&](int64_t n, int oh, int ow, int64_t) {
    acc.add(conv_at<K, CL>(x, g, n, o.c, oh, ow, w, win));
  });
  Moments<acc_t> m = acc.moments();
  if (!CL) m = warp_reduce(m);
  EFFNET_DYNAMIC_SHARED(smem);
  m = reduce_rows(m, reinterpret_cast<Moments<acc_t>*>(smem));
  if (threadIdx.y == 0 && o.active && (CL || threadIdx.x == 0)) partials[int64_t(blockIdx.y) * g.C + o.c] = m;
}

// Merges the per-chunk Moments of each channel: mean[c], biased var[c].
template <class acc_t>
__global__ void __launch_bounds__(kThreads)
    dw_finalize_stats_kernel(const Moments<acc_t>* __restrict__ partials, int64_t chunks, int64_t C,
                             acc_t* __restrict__ mean, acc_t* __restrict__ var) {
  const int64_t c = int64_t(blockIdx.x) * kWarp + threadIdx.x;
  Moments<acc_t> m{acc_t(0), acc_t(0), acc_t(0)};
  if (c < C) {
    for (int64_t chunk = threadIdx.y; chunk < chunks; chunk += kRows) m = combine(m, partials[chunk * C + c]);
  }
  EFFNET_DYNAMIC_SHARED(smem);
  m = reduce_rows(m, reinterpret_cast<Moments<acc_t>*>(smem));
  if (threadIdx.y == 0 && c < C) {
    mean[c] = m.mean;
    var[c] = m.n > acc_t(0) ? m.m2 / m.n : acc_t(0);
  }
}

// out = silu(y * scale[c] + shift[c]).
template <int K, bool CL, class scalar_t, class acc_t>
__global__ void __launch_bounds__(kThreads)
    dw_forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ weight,
                      const acc_t* __restrict__ scale, const acc_t* __restrict__ shift, ConvGeom g,
                      scalar_t* __restrict__ out) {
  const Ownership o = owned_positions<CL>(g.C, g.N * g.OH * g.OW, g.chunk_len);
  acc_t w[K * K], win[K * K];
  load_filter<K>(weight, o, w);
  const acc_t a = o.active ? scale[o.c] : acc_t(0), b = o.active ? shift[o.c] : acc_t(0);
  for_each_owned<CL>(o, g.C, g.OH, g.OW, g.inv_plane, [&](int64_t n, int oh, int ow, int64_t off) {
    out[off] = static_cast<scalar_t>(silu(conv_at<K, CL>(x, g, n, o.c, oh, ow, w, win) * a + b));
  });
}

// Per-chunk (sum dz, sum dz * (y - mean)) per channel, dz = grad * silu'(y * scale + shift):
// partials[(chunk * C + c) * 2 + {0, 1}].
template <int K, bool CL, class scalar_t, class acc_t>
__global__ void __launch_bounds__(kThreads)
    dw_backward_reduce_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ x,
                              const scalar_t* __restrict__ weight, const acc_t* __restrict__ scale,
                              const acc_t* __restrict__ shift, const acc_t* __restrict__ mean, ConvGeom g,
                              acc_t* __restrict__ partials) {
  const Ownership o = owned_positions<CL>(g.C, g.N * g.OH * g.OW, g.chunk_len);
  acc_t w[K * K], win[K * K];
  load_filter<K>(weight, o, w);
  const acc_t a = o.active ? scale[o.c] : acc_t(0), b = o.active ? shift[o.c] : acc_t(0);
  const acc_t mu = o.active ? mean[o.c] : acc_t(0);
  Sums<acc_t, 2> s{{acc_t(0), acc_t(0)}};
  for_each_owned<CL>(o, g.C, g.OH, g.OW, g.inv_plane, [&](int64_t n, int oh, int ow, int64_t off) {
    const acc_t y = conv_at<K, CL>(x, g, n, o.c, oh, ow, w, win);
    const acc_t dz = static_cast<acc_t>(grad_out[off]) * silu_grad(y * a + b);
    s.v[0] += dz;
    s.v[1] += dz * (y - mu);
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

// dy = coef_a * dz + coef_b * y + coef_c into dy_buf (acc_t, layout of the output),
// and the per-chunk weight gradient sum(x_window * dy): partials[(chunk * C + c) * K * K + i].
template <int K, bool CL, class scalar_t, class acc_t>
__global__ void __launch_bounds__(kThreads)
    dw_backward_dy_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ x,
                          const scalar_t* __restrict__ weight, const acc_t* __restrict__ scale,
                          const acc_t* __restrict__ shift, const acc_t* __restrict__ coef_a,
                          const acc_t* __restrict__ coef_b, const acc_t* __restrict__ coef_c, ConvGeom g,
                          acc_t* __restrict__ dy_buf, acc_t* __restrict__ partials) {
  const Ownership o = owned_positions<CL>(g.C, g.N * g.OH * g.OW, g.chunk_len);
  acc_t w[K * K], win[K * K];
  load_filter<K>(weight, o, w);
  const acc_t a = o.active ? scale[o.c] : acc_t(0), b = o.active ? shift[o.c] : acc_t(0);
  const acc_t ca = o.active ? coef_a[o.c] : acc_t(0), cb = o.active ? coef_b[o.c] : acc_t(0);
  const acc_t cc = o.active ? coef_c[o.c] : acc_t(0);
  Sums<acc_t, K * K> gw;
#pragma unroll
  for (int i = 0; i < K * K; ++i) gw.v[i] = acc_t(0);
  for_each_owned<CL>(o, g.C, g.OH, g.OW, g.inv_plane, [&](int64_t n, int oh, int ow, int64_t off) {
    const acc_t y = conv_at<K, CL>(x, g, n, o.c, oh, ow, w, win);
    const acc_t dz = static_cast<acc_t>(grad_out[off]) * silu_grad(y * a + b);
    const acc_t dy = ca * dz + cb * y + cc;
    dy_buf[off] = dy;
#pragma unroll
    for (int i = 0; i < K * K; ++i) gw.v[i] += win[i] * dy;
  });
  if (!CL) gw = warp_reduce(gw);
  EFFNET_DYNAMIC_SHARED(smem);
  gw = reduce_rows(gw, reinterpret_cast<Sums<acc_t, K * K>*>(smem));
  if (threadIdx.y == 0 && o.active && (CL || threadIdx.x == 0)) {
    acc_t* dst = partials + (int64_t(blockIdx.y) * g.C + o.c) * (K * K);
#pragma unroll
    for (int i = 0; i < K * K; ++i) dst[i] = gw.v[i];
  }
}

// grad_x = transposed depthwise conv of dy: each input position gathers the
// outputs whose window covers it.
template <int K, bool CL, class scalar_t, class acc_t>
__global__ void __launch_bounds__(kThreads)
    dw_backward_input_kernel(const acc_t* __restrict__ dy_buf, const scalar_t* __restrict__ weight, ConvGeom g,
                             scalar_t* __restrict__ grad_x) {
  const Ownership o = owned_positions<CL>(g.C, g.N * g.H * g.W, g.chunk_len);
  acc_t w[K * K];
  load_filter<K>(weight, o, w);
  const int odd_mask = g.stride - 1, shift = g.stride >> 1;  // stride is 1 or 2
  const int64_t col_stride = CL ? g.C : 1;
  for_each_owned<CL>(o, g.C, g.H, g.W, g.inv_plane, [&](int64_t n, int ih, int iw, int64_t off) {
    const acc_t* dy_plane = dy_buf + element_offset<CL>(n, o.c, 0, 0, g.C, g.OH, g.OW);
    acc_t sum = 0;
#pragma unroll
    for (int i = 0; i < K; ++i) {
      const int th = ih + g.pad_h - i;
      const int oh = th >> shift;
      const bool row_in = th >= 0 && (th & odd_mask) == 0 && oh < g.OH;
#pragma unroll
      for (int j = 0; j < K; ++j) {
        const int tw = iw + g.pad_w - j;
        const int ow = tw >> shift;
        if (row_in && tw >= 0 && (tw & odd_mask) == 0 && ow < g.OW) {
          sum += dy_plane[(oh * g.OW + ow) * col_stride] * w[i * K + j];
        }
      }
    }
    grad_x[off] = static_cast<scalar_t>(sum);
  });
}

// out[col] = sum over rows of partials[row * row_stride + col * col_step], for
// cols columns (32 per block; the block's rows split the row range).
template <class acc_t, class out_t>
__global__ void __launch_bounds__(kThreads)
    sum_columns_kernel(const acc_t* __restrict__ partials, int64_t rows, int64_t row_stride, int64_t cols,
                       int64_t col_step, out_t* __restrict__ out) {
  const int64_t col = int64_t(blockIdx.x) * kWarp + threadIdx.x;
  Sums<acc_t, 1> s{{acc_t(0)}};
  if (col < cols) {
    for (int64_t r = threadIdx.y; r < rows; r += kRows) s.v[0] += partials[r * row_stride + col * col_step];
  }
  EFFNET_DYNAMIC_SHARED(smem);
  s = reduce_rows(s, reinterpret_cast<Sums<acc_t, 1>*>(smem));
  if (threadIdx.y == 0 && col < cols) out[col] = static_cast<out_t>(s.v[0]);
}

}  // namespace effnet_fast::cuda_backend
