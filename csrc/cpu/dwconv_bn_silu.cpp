// Depthwise conv + BatchNorm + SiLU kernels for CPU tensors.
//
// The conv output y is never stored: every kernel recomputes it from x where
// it needs it, so each op is one pass over its inputs.
//
// Padding: (top, bottom, left, right), each at most K / 2 (csrc/dw_padding.h).
//
// NCHW: tasks are (n, c) planes. A plane is first copied into a zero-padded
// scratch plane in acc_t (split into even and odd columns for stride 2), so the
// row loops need no bounds checks and read contiguous vectors along W.
// Channels_last: tasks are rows of pixels, vectorized along C; padding is
// handled per pixel by clipping the window of taps.
//
// Reductions (statistics, sums, grad_weight) keep per-task partials that are
// combined in a fixed order, so results do not depend on the thread count.
#include "../dw_padding.h"
#include "activation_cache.h"
#include "cpu_utils.h"

#include <array>
#include <vector>

namespace effnet_fast::cpu {
namespace {

// PT / PL: zeros above / left of the input (at most K / 2); the bottom and right
// padding only shows in OH and OW (reads past H or W are zeros).
struct Geometry {
  int64_t N, C, H, W, K, S, PT, PL, OH, OW;
};

Geometry check_conv_inputs(const at::Tensor& x, const at::Tensor& weight, int64_t stride,
                           at::OptionalIntArrayRef padding, const char* op) {
  check_input(x, op);
  const int64_t C = x.size(1);
  TORCH_CHECK(weight.device() == x.device(), op, ": weight is on ", weight.device(), ", x on ", x.device());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight dtype ", weight.scalar_type(),
              " differs from x dtype ", x.scalar_type());
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == C && weight.size(1) == 1 && weight.size(2) == weight.size(3),
              op, ": x has ", C, " channels, so the depthwise weight must be (", C, ", 1, k, k); got ",
              weight.sizes());
  const int64_t k = weight.size(3);
  TORCH_CHECK(k == 3 || k == 5, op, ": unsupported kernel size ", k, "; supported: 3, 5");
  TORCH_CHECK(stride == 1 || stride == 2, op, ": unsupported stride ", stride, "; supported: 1, 2");
  const int64_t H = x.size(2), W = x.size(3);
  const DwPadding pad = dw_padding(padding, k, stride, H, W, op);
  return {x.size(0), C, H, W, k, stride, pad.top, pad.left, pad.out_h, pad.out_w};
}

// Calls fn(integral_constant K, integral_constant S) with the compile-time kernel size and stride.
template <typename Fn>
void with_kernel_shape(const Geometry& g, Fn&& fn) {
  using std::integral_constant;
  if (g.K == 3 && g.S == 1) return fn(integral_constant<int, 3>{}, integral_constant<int, 1>{});
  if (g.K == 3 && g.S == 2) return fn(integral_constant<int, 3>{}, integral_constant<int, 2>{});
  if (g.K == 5 && g.S == 1) return fn(integral_constant<int, 5>{}, integral_constant<int, 1>{});
  return fn(integral_constant<int, 5>{}, integral_constant<int, 2>{});
}

// ---------------------------------------------------------------------------
// NCHW

// One zero-padded plane in acc_t: `parities` arrays (1, or 2 for even / odd
// columns of the padded plane) of `rows` rows of `width`. Only the interior is
// rewritten per plane, so the padding stays zero.
template <typename acc_t>
class Scratch {
 public:
  Scratch(int64_t parities, int64_t rows, int64_t width)
      : rows_(rows), width_(width), buf_(parities * rows * width, acc_t(0)) {}
  acc_t* row(int64_t r, int64_t parity = 0) { return buf_.data() + (parity * rows_ + r) * width_; }

 private:
  int64_t rows_, width_;
  std::vector<acc_t> buf_;
};

template <typename acc_t>
constexpr int64_t lanes() {
  return Vectorized<acc_t>::size();
}

// Scratch for the padded input plane: row r, column q of the padded plane is at
// row(r, q % S)[q / S].
template <typename acc_t>
Scratch<acc_t> input_scratch(const Geometry& g) {
  constexpr int64_t V = lanes<acc_t>();
  const int64_t P = g.K / 2;  // the most padding on any side
  const int64_t width = std::max(round_up(g.OW, V) + g.K, (g.W + 2 * P) / g.S + 2) + 2 * V;
  return Scratch<acc_t>(g.S, g.H + 2 * P, width);
}

template <typename scalar_t, typename acc_t>
void load_padded_plane(Scratch<acc_t>& pad, const scalar_t* plane, const Geometry& g) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  for (int64_t r = 0; r < g.H; ++r) {
    const scalar_t* src = plane + r * g.W;
    if (g.S == 1) {
      acc_t* dst = pad.row(r + g.PT) + g.PL;
      for (int64_t col = 0; col < g.W; col += V) load_acc<acc_t>(src + col, std::min(V, g.W - col)).store(dst + col);
      continue;
    }
    // Column col = 2m + e of x is padded column q = col + PL: array (e + PL) % 2, index m + (e + PL) / 2.
    acc_t* even_dst = pad.row(r + g.PT, g.PL % 2) + g.PL / 2;
    acc_t* odd_dst = pad.row(r + g.PT, (1 + g.PL) % 2) + (1 + g.PL) / 2;
    for (int64_t col = 0; col < g.W; col += 2 * V) {
      const int64_t cnt = std::min(2 * V, g.W - col);
      const Vec a = load_acc<acc_t>(src + col, std::min(V, cnt));
      const Vec b = cnt > V ? load_acc<acc_t>(src + col + V, cnt - V) : Vec(acc_t(0));
      auto [even, odd] = at::vec::deinterleave2(a, b);
      even.store(even_dst + col / 2);
      odd.store(odd_dst + col / 2);
    }
  }
}

// The K x K taps of output row oh over a padded plane: tap (kh, kw) at output
// column ow is rows[kh][kw % S][ow + kw / S].
template <int K, int S, typename acc_t>
struct RowTaps {
  using Vec = Vectorized<acc_t>;
  const acc_t* rows[K][S];

  RowTaps(Scratch<acc_t>& pad, int64_t oh) {
    for (int kh = 0; kh < K; ++kh)
      for (int par = 0; par < S; ++par) rows[kh][par] = pad.row(oh * S + kh, par);
  }
  Vec tap(int kh, int kw, int64_t ow) const { return Vec::loadu(rows[kh][kw % S] + ow + kw / S); }
  Vec conv(const Vec* w, int64_t ow) const {
    // Two partial sums halve the FMA dependency chain.
    Vec acc0(acc_t(0)), acc1(acc_t(0));
    for (int kh = 0; kh < K; ++kh)
      for (int kw = 0; kw < K; ++kw) {
        Vec& acc = ((kh * K + kw) & 1) ? acc1 : acc0;
        acc = at::vec::fmadd(tap(kh, kw, ow), w[kh * K + kw], acc);
      }
    return acc0 + acc1;
  }
};

template <int K, typename acc_t>
std::array<Vectorized<acc_t>, K * K> broadcast_weights(const acc_t* w) {
  std::array<Vectorized<acc_t>, K * K> out;
  for (int i = 0; i < K * K; ++i) out[i] = Vectorized<acc_t>(w[i]);
  return out;
}

// Runs fn(plane, pad) for every (n, c) plane of x after loading it into `pad`.
template <typename scalar_t, typename acc_t, typename Fn>
void for_each_plane(const scalar_t* x, const Geometry& g, Fn&& fn) {
  at::parallel_for(0, g.N * g.C, 1, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> pad = input_scratch<acc_t>(g);
    for (int64_t plane = begin; plane < end; ++plane) {
      load_padded_plane(pad, x + plane * g.H * g.W, g);
      fn(plane, pad);
    }
  });
}

template <int K, int S, typename scalar_t, typename acc_t>
void forward_nchw(const scalar_t* x, const acc_t* w, const acc_t* scale, const acc_t* shift, scalar_t* out,
                  const Geometry& g) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  for_each_plane<scalar_t, acc_t>(x, g, [&](int64_t plane, Scratch<acc_t>& pad) {
    const int64_t c = plane % g.C;
    const auto wv = broadcast_weights<K>(w + c * K * K);
    const Vec sc(scale[c]), sh(shift[c]);
    for (int64_t oh = 0; oh < g.OH; ++oh) {
      const RowTaps<K, S, acc_t> taps(pad, oh);
      scalar_t* dst = out + (plane * g.OH + oh) * g.OW;
      for (int64_t ow = 0; ow < g.OW; ow += V) {
        const Vec z = at::vec::fmadd(taps.conv(wv.data(), ow), sc, sh);
        store_acc(dst + ow, silu(z), std::min(V, g.OW - ow));
      }
    }
  });
}

// Per-plane mean and M2 of y into plane_mean / plane_m2: y of the plane goes to
// a scratch plane, then two passes over it (the second also measures how far
// the rounded mean is off, and corrects M2 for it).
template <int K, int S, typename scalar_t, typename acc_t>
void stats_nchw(const scalar_t* x, const acc_t* w, double* plane_mean, double* plane_m2, const Geometry& g) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const int64_t width = round_up(g.OW, V);
  const double count = double(g.OH * g.OW);
  at::parallel_for(0, g.N * g.C, 1, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> pad = input_scratch<acc_t>(g);
    std::vector<acc_t> ys(g.OH * width);
    for (int64_t plane = begin; plane < end; ++plane) {
      load_padded_plane(pad, x + plane * g.H * g.W, g);
      const auto wv = broadcast_weights<K>(w + (plane % g.C) * K * K);
      Vec sum(acc_t(0));
      for (int64_t oh = 0; oh < g.OH; ++oh) {
        const RowTaps<K, S, acc_t> taps(pad, oh);
        acc_t* row = ys.data() + oh * width;
        for (int64_t ow = 0; ow < g.OW; ow += V) {
          const Vec y = keep_lanes(taps.conv(wv.data(), ow), g.OW - ow);
          y.store(row + ow);
          sum = sum + y;
        }
      }
      const acc_t rounded_mean = static_cast<acc_t>(lane_sum(sum) / count);
      const Vec mean(rounded_mean);
      Vec dev(acc_t(0)), sq(acc_t(0));
      for (int64_t oh = 0; oh < g.OH; ++oh)
        for (int64_t ow = 0; ow < g.OW; ow += V) {
          const Vec d = keep_lanes(Vec::loadu(ys.data() + oh * width + ow) - mean, g.OW - ow);
          dev = dev + d;
          sq = at::vec::fmadd(d, d, sq);
        }
      const double offset = lane_sum(dev) / count;  // exact mean - rounded mean
      plane_mean[plane] = double(rounded_mean) + offset;
      plane_m2[plane] = std::max(0.0, lane_sum(sq) - offset * offset * count);
    }
  });
}

// Per-plane sums of dz and dz * (y - mean).
template <int K, int S, typename scalar_t, typename acc_t>
void backward_reduce_nchw(const scalar_t* grad, const scalar_t* x, const acc_t* w, const acc_t* scale,
                          const acc_t* shift, const acc_t* mean, double* sum_dz, double* sum_dz_xmu,
                          const Geometry& g) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  for_each_plane<scalar_t, acc_t>(x, g, [&](int64_t plane, Scratch<acc_t>& pad) {
    const int64_t c = plane % g.C;
    const auto wv = broadcast_weights<K>(w + c * K * K);
    const Vec sc(scale[c]), sh(shift[c]), mu(mean[c]);
    double total_dz = 0, total_dz_xmu = 0;
    Vec s_dz(acc_t(0)), s_dz_xmu(acc_t(0));
    for (int64_t oh = 0; oh < g.OH; ++oh) {
      const RowTaps<K, S, acc_t> taps(pad, oh);
      const scalar_t* grow = grad + (plane * g.OH + oh) * g.OW;
      for (int64_t ow = 0; ow < g.OW; ow += V) {
        const Vec y = taps.conv(wv.data(), ow);
        // grad loads zero past the row end, so dz is zero there.
        const Vec dz = load_acc<acc_t>(grow + ow, std::min(V, g.OW - ow)) * silu_grad(at::vec::fmadd(y, sc, sh));
        s_dz = s_dz + dz;
        s_dz_xmu = at::vec::fmadd(dz, y - mu, s_dz_xmu);
      }
      // Flushed to double every 8 rows (per row would dominate on small planes).
      if (oh % 8 == 7 || oh == g.OH - 1) {
        total_dz += lane_sum(s_dz);
        total_dz_xmu += lane_sum(s_dz_xmu);
        s_dz = s_dz_xmu = Vec(acc_t(0));
      }
    }
    sum_dz[plane] = total_dz;
    sum_dz_xmu[plane] = total_dz_xmu;
  });
}

// The zero margin around dy in the grad_x pass: output rows and columns from -(K - 1)
// to O + K - 2 are read, whatever the padding.
template <int K>
constexpr int kDyMargin = K - 1;

// grad_x row ih of one plane from dy held in `dys` at (oh + M, ow + M), M = kDyMargin.
// Stride 1: tap (kh, kw) reads dy[ih + PT - kh][iw + PL - kw].
template <int K, typename scalar_t, typename acc_t>
void grad_input_row_s1(Scratch<acc_t>& dys, const Vectorized<acc_t>* w, int64_t ih, scalar_t* dst,
                       const Geometry& g) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  constexpr int M = kDyMargin<K>;
  const acc_t* rows[K];
  for (int kh = 0; kh < K; ++kh) rows[kh] = dys.row(ih + g.PT - kh + M) + g.PL + M;
  for (int64_t iw = 0; iw < g.W; iw += V) {
    Vec acc0(acc_t(0)), acc1(acc_t(0));
    for (int kh = 0; kh < K; ++kh)
      for (int kw = 0; kw < K; ++kw) {
        Vec& acc = ((kh * K + kw) & 1) ? acc1 : acc0;
        acc = at::vec::fmadd(Vec::loadu(rows[kh] + iw - kw), w[kh * K + kw], acc);
      }
    store_acc(dst + iw, acc0 + acc1, std::min(V, g.W - iw));
  }
}

// Stride 2: row ih takes the taps kh with ih + PT - kh even, from dy row
// (ih + PT - kh) / 2; column iw = 2j + E the taps kw with E + PL - kw even, from dy
// column j + (E + PL - kw) / 2. LP = PL % 2 decides at compile time which taps feed the
// even and which the odd columns. Both column parities are computed, then interleaved
// into the row.
template <int K, int LP, typename scalar_t, typename acc_t>
void grad_input_row_s2(Scratch<acc_t>& dys, const Vectorized<acc_t>* w, int64_t ih, scalar_t* dst,
                       const Geometry& g) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  constexpr int M = kDyMargin<K>;
  const acc_t* rows[K];
  for (int kh = 0; kh < K; ++kh) {
    const int64_t t = ih + g.PT - kh;  // even t: output row t / 2 (exact, also below 0)
    rows[kh] = (t & 1) ? nullptr : dys.row(t / 2 + M) + (g.PL - LP) / 2 + M;
  }
  for (int64_t j = 0; 2 * j < g.W; j += V) {
    Vec even(acc_t(0)), odd(acc_t(0));
    for (int kh = 0; kh < K; ++kh) {
      if (rows[kh] == nullptr) continue;
      for (int kw = 0; kw < K; ++kw) {
        if ((LP - kw) & 1) {
          odd = at::vec::fmadd(Vec::loadu(rows[kh] + j + (1 + LP - kw) / 2), w[kh * K + kw], odd);
        } else {
          even = at::vec::fmadd(Vec::loadu(rows[kh] + j + (LP - kw) / 2), w[kh * K + kw], even);
        }
      }
    }
    auto [lo, hi] = at::vec::interleave2(even, odd);
    const int64_t left = g.W - 2 * j;
    store_acc(dst + 2 * j, lo, std::min(V, left));
    if (left > V) store_acc(dst + 2 * j + V, hi, std::min(V, left - V));
  }
}

// grad_x and per-plane grad_weight (plane_gw[plane][K * K]).
template <int K, int S, typename scalar_t, typename acc_t>
void backward_nchw(const scalar_t* grad, const scalar_t* x, const acc_t* w, const acc_t* scale,
                   const acc_t* shift, const acc_t* coef_a, const acc_t* coef_b, const acc_t* coef_c,
                   scalar_t* grad_x, double* plane_gw, const Geometry& g) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  constexpr int M = kDyMargin<K>;
  at::parallel_for(0, g.N * g.C, 1, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> pad = input_scratch<acc_t>(g);
    // dy at (oh + M, ow + M) with a zero margin of M on every side.
    Scratch<acc_t> dys(1, g.OH + 2 * M + 1, round_up(std::max(g.OW, g.W), V) + 2 * M + 2 * V);
    for (int64_t plane = begin; plane < end; ++plane) {
      load_padded_plane(pad, x + plane * g.H * g.W, g);
      const int64_t c = plane % g.C;
      const auto wv = broadcast_weights<K>(w + c * K * K);
      const Vec sc(scale[c]), sh(shift[c]), ca(coef_a[c]), cb(coef_b[c]), cc(coef_c[c]);
      std::array<Vec, K * K> gw;
      gw.fill(Vec(acc_t(0)));
      for (int64_t oh = 0; oh < g.OH; ++oh) {
        const RowTaps<K, S, acc_t> taps(pad, oh);
        const scalar_t* grow = grad + (plane * g.OH + oh) * g.OW;
        acc_t* dy_row = dys.row(oh + M) + M;
        for (int64_t ow = 0; ow < g.OW; ow += V) {
          const int64_t cnt = std::min(V, g.OW - ow);
          const Vec y = taps.conv(wv.data(), ow);
          const Vec dz = load_acc<acc_t>(grow + ow, cnt) * silu_grad(at::vec::fmadd(y, sc, sh));
          // Lanes past the row end must stay zero: they are the right margin.
          const Vec dy = keep_lanes(at::vec::fmadd(ca, dz, at::vec::fmadd(cb, y, cc)), cnt);
          dy.store(dy_row + ow);
          for (int kh = 0; kh < K; ++kh)
            for (int kw = 0; kw < K; ++kw) gw[kh * K + kw] = at::vec::fmadd(dy, taps.tap(kh, kw, ow), gw[kh * K + kw]);
        }
      }
      for (int i = 0; i < K * K; ++i) plane_gw[plane * K * K + i] = lane_sum(gw[i]);
      scalar_t* gx = grad_x + plane * g.H * g.W;
      for (int64_t ih = 0; ih < g.H; ++ih) {
        if constexpr (S == 1) {
          grad_input_row_s1<K>(dys, wv.data(), ih, gx + ih * g.W, g);
        } else if (g.PL % 2 == 0) {
          grad_input_row_s2<K, 0>(dys, wv.data(), ih, gx + ih * g.W, g);
        } else {
          grad_input_row_s2<K, 1>(dys, wv.data(), ih, gx + ih * g.W, g);
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------
// Channels_last
//
// Every loop runs over blocks of V channels outermost, so the block's K * K
// weight vectors (or K * K grad_weight accumulators) stay in registers or L1
// while the pixels of a row stream past.

template <int K, typename acc_t>
struct TapWeights {
  Vectorized<acc_t> w[K * K];
  TapWeights(const acc_t* wt, int64_t C, int64_t c, int64_t cnt) {
    for (int i = 0; i < K * K; ++i) w[i] = Vectorized<acc_t>::loadu(wt + i * C + c, cnt);
  }
};

// The taps of output pixel (oh, ow) that fall inside the image, and the offset
// (in elements, from the image start, channel c) of its top-left tap.
struct Window {
  int kh_lo, kh_hi, kw_lo, kw_hi;
  int64_t offset;
};

EFFNET_ALWAYS_INLINE Window window_of(const Geometry& g, int64_t oh, int64_t ow, int64_t c) {
  const int64_t ih0 = oh * g.S - g.PT, iw0 = ow * g.S - g.PL;
  return {int(std::max<int64_t>(0, -ih0)), int(std::min<int64_t>(g.K, g.H - ih0)),
          int(std::max<int64_t>(0, -iw0)), int(std::min<int64_t>(g.K, g.W - iw0)),
          (ih0 * g.W + iw0) * g.C + c};
}

// Calls fn(kh, kw, x pointer) for every tap of the window inside the image;
// FullRows / FullCols say that the window is known to be whole along H / W.
template <int K, bool FullRows, bool FullCols, typename scalar_t, typename Fn>
EFFNET_ALWAYS_INLINE void for_each_tap(const scalar_t* image, const Window& win, const Geometry& g, Fn&& fn) {
  const int64_t row_stride = g.W * g.C;
#pragma GCC unroll 5
  for (int kh = 0; kh < K; ++kh) {
    if (!FullRows && (kh < win.kh_lo || kh >= win.kh_hi)) continue;
#pragma GCC unroll 5
    for (int kw = 0; kw < K; ++kw) {
      if (!FullCols && (kw < win.kw_lo || kw >= win.kw_hi)) continue;
      fn(kh, kw, image + (win.offset + kh * row_stride + kw * g.C));
    }
  }
}

// Calls for_each_tap with the window's fullness as template arguments.
template <int K, typename scalar_t, typename Fn>
EFFNET_ALWAYS_INLINE void for_each_window_tap(const scalar_t* image, const Window& win, const Geometry& g, Fn&& fn) {
  const bool full_rows = win.kh_lo == 0 && win.kh_hi == K, full_cols = win.kw_lo == 0 && win.kw_hi == K;
  if (full_rows && full_cols) {
    for_each_tap<K, true, true>(image, win, g, fn);
  } else if (full_cols) {
    for_each_tap<K, false, true>(image, win, g, fn);
  } else if (full_rows) {
    for_each_tap<K, true, false>(image, win, g, fn);
  } else {
    for_each_tap<K, false, false>(image, win, g, fn);
  }
}

template <int K, bool Partial, typename scalar_t, typename acc_t>
EFFNET_ALWAYS_INLINE Vectorized<acc_t> conv_window(const scalar_t* image, const Window& win, const Geometry& g,
                                     const Vectorized<acc_t>* w, int64_t cnt) {
  using Vec = Vectorized<acc_t>;
  Vec acc0(acc_t(0)), acc1(acc_t(0));
  for_each_window_tap<K>(image, win, g, [&](int kh, int kw, const scalar_t* p) {
    Vec& acc = ((kh * K + kw) & 1) ? acc1 : acc0;
    acc = at::vec::fmadd(Partial ? load_acc<acc_t>(p, cnt) : load_acc<acc_t>(p), w[kh * K + kw], acc);
  });
  return acc0 + acc1;
}

// y at pixel (oh, ow), channels [c, c + cnt). Whole vectors (the common case)
// load without masks.
template <int K, typename scalar_t, typename acc_t>
EFFNET_ALWAYS_INLINE Vectorized<acc_t> conv_pixel(const scalar_t* image, const Geometry& g, int64_t oh, int64_t ow, int64_t c,
                                    const Vectorized<acc_t>* w, int64_t cnt) {
  const Window win = window_of(g, oh, ow, c);
  return cnt == Vectorized<acc_t>::size() ? conv_window<K, false>(image, win, g, w, cnt)
                                          : conv_window<K, true>(image, win, g, w, cnt);
}

// The backward kernels read grad_out along a row one channel block (one cache line
// of a pixel) at a time, a stride the hardware prefetchers do not follow: they ask
// for it this many pixels ahead. (A prefetch past the end of the tensor is harmless:
// prefetches do not fault.)
constexpr int64_t kPrefetchPixels = 8;

// Interior output pixels computed together: one pixel's K * K taps form two
// dependent FMA chains, too few to hide the FMA latency; kPixelBlock pixels give
// 2 * kPixelBlock independent chains that share each weight vector.
constexpr int64_t kPixelBlock = 4;

// y at the kPixelBlock pixels whose top-left taps are at tl, tl + pixel_step, ...,
// all windows inside the image, whole vectors of channels. The same taps in the
// same order into the same two partial sums as conv_window: equal to conv_pixel
// bit for bit.
template <int K, typename scalar_t, typename acc_t>
EFFNET_ALWAYS_INLINE void conv_pixel_block(const scalar_t* tl, int64_t row_stride, int64_t C, int64_t pixel_step,
                                           const Vectorized<acc_t>* w, Vectorized<acc_t>* ys) {
  using Vec = Vectorized<acc_t>;
  Vec acc0[kPixelBlock], acc1[kPixelBlock];
  for (int64_t j = 0; j < kPixelBlock; ++j) acc0[j] = acc1[j] = Vec(acc_t(0));
#pragma GCC unroll 5
  for (int kh = 0; kh < K; ++kh) {
#pragma GCC unroll 5
    for (int kw = 0; kw < K; ++kw) {
      const scalar_t* p = tl + kh * row_stride + kw * C;
      const Vec wv = w[kh * K + kw];
      for (int64_t j = 0; j < kPixelBlock; ++j) {
        Vec& acc = ((kh * K + kw) & 1) ? acc1[j] : acc0[j];
        acc = at::vec::fmadd(load_acc<acc_t>(p + j * pixel_step), wv, acc);
      }
    }
  }
  for (int64_t j = 0; j < kPixelBlock; ++j) ys[j] = acc0[j] + acc1[j];
}

// y of output row oh of one image, channels [c, c + cnt), into ys[0, OW): the
// interior pixels kPixelBlock at a time, the border ones (and partial channel
// vectors) one at a time.
template <int K, typename scalar_t, typename acc_t>
void conv_row(const scalar_t* image, const Geometry& g, int64_t oh, int64_t c, const Vectorized<acc_t>* w,
              int64_t cnt, Vectorized<acc_t>* ys) {
  const int64_t ih0 = oh * g.S - g.PT;
  int64_t ow = 0;
  if (cnt == Vectorized<acc_t>::size() && ih0 >= 0 && ih0 + K <= g.H && g.W >= K) {
    // whole windows: ow * S - PL >= 0 and ow * S - PL + K <= W
    const int64_t lo = std::min(g.OW, (g.PL + g.S - 1) / g.S);
    const int64_t hi = std::min(g.OW, (g.W - K + g.PL) / g.S + 1);
    for (; ow < lo; ++ow) ys[ow] = conv_pixel<K>(image, g, oh, ow, c, w, cnt);
    const scalar_t* row = image + ih0 * g.W * g.C + c;
    for (; ow + kPixelBlock <= hi; ow += kPixelBlock)
      conv_pixel_block<K>(row + (ow * g.S - g.PL) * g.C, g.W * g.C, g.C, g.S * g.C, w, ys + ow);
  }
  for (; ow < g.OW; ++ow) ys[ow] = conv_pixel<K>(image, g, oh, ow, c, w, cnt);
}

// Runs fn(n, oh, ys) in parallel over the output rows of every image; ys is a
// scratch row of OW vectors of the calling thread.
template <typename acc_t, typename Fn>
void for_each_output_row(const Geometry& g, Fn&& fn) {
  at::parallel_for(0, g.N * g.OH, 1, [&](int64_t begin, int64_t end) {
    std::vector<Vectorized<acc_t>> ys(g.OW);
    for (int64_t task = begin; task < end; ++task) fn(task / g.OH, task % g.OH, ys.data());
  });
}

template <int K, typename scalar_t, typename acc_t>
void forward_nhwc(const scalar_t* x, const acc_t* wt, const acc_t* scale, const acc_t* shift, scalar_t* out,
                  const Geometry& geo) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  for_each_output_row<acc_t>(geo, [&](int64_t n, int64_t oh, Vec* ys) {
    const Geometry g = geo;  // a local copy: vector stores may alias anything
    const scalar_t* image = x + n * g.H * g.W * g.C;
    scalar_t* dst = out + (n * g.OH + oh) * g.OW * g.C;
    for (int64_t c = 0; c < g.C; c += V) {
      const int64_t cnt = std::min(V, g.C - c);
      const TapWeights<K, acc_t> tw(wt, g.C, c, cnt);
      const Vec sc = Vec::loadu(scale + c, cnt), sh = Vec::loadu(shift + c, cnt);
      conv_row<K>(image, g, oh, c, tw.w, cnt, ys);
      for (int64_t ow = 0; ow < g.OW; ++ow) store_acc(dst + ow * g.C + c, silu(at::vec::fmadd(ys[ow], sc, sh)), cnt);
    }
  });
}

template <typename acc_t>
void store_lanes(double* dst, const Vectorized<acc_t>& v, int64_t cnt) {
  __at_align__ acc_t lanes[Vectorized<acc_t>::size()];
  v.store(lanes);
  for (int64_t l = 0; l < cnt; ++l) dst[l] = lanes[l];
}

// Per-row (n, oh) mean and M2 of y per channel: row_mean / row_m2 are [N * OH][C].
template <int K, typename scalar_t, typename acc_t>
void stats_nhwc(const scalar_t* x, const acc_t* wt, double* row_mean, double* row_m2, const Geometry& geo) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  for_each_output_row<acc_t>(geo, [&](int64_t n, int64_t oh, Vec* ys) {
    const Geometry g = geo;  // a local copy: vector stores may alias anything
    const int64_t task = n * g.OH + oh;
    const scalar_t* image = x + n * g.H * g.W * g.C;
    const Vec inv_count(acc_t(1) / acc_t(g.OW));
    for (int64_t c = 0; c < g.C; c += V) {
      const int64_t cnt = std::min(V, g.C - c);
      const TapWeights<K, acc_t> tw(wt, g.C, c, cnt);
      conv_row<K>(image, g, oh, c, tw.w, cnt, ys);
      Vec sum(acc_t(0));
      for (int64_t ow = 0; ow < g.OW; ++ow) sum = sum + ys[ow];
      const Vec mean = sum * inv_count;
      Vec sq(acc_t(0));
      for (int64_t ow = 0; ow < g.OW; ++ow) sq = at::vec::fmadd(ys[ow] - mean, ys[ow] - mean, sq);
      store_lanes(row_mean + task * g.C + c, mean, cnt);
      store_lanes(row_m2 + task * g.C + c, sq, cnt);
    }
  });
}

// Per-row (n, oh) sums of dz and dz * (y - mean): [N * OH][C].
template <int K, typename scalar_t, typename acc_t>
void backward_reduce_nhwc(const scalar_t* grad, const scalar_t* x, const acc_t* wt, const acc_t* scale,
                          const acc_t* shift, const acc_t* mean, double* row_dz, double* row_dz_xmu,
                          const Geometry& geo) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  for_each_output_row<acc_t>(geo, [&](int64_t n, int64_t oh, Vec* ys) {
    const Geometry g = geo;  // a local copy: vector stores may alias anything
    const int64_t task = n * g.OH + oh;
    const scalar_t* image = x + n * g.H * g.W * g.C;
    const scalar_t* grow = grad + task * g.OW * g.C;
    for (int64_t c = 0; c < g.C; c += V) {
      const int64_t cnt = std::min(V, g.C - c);
      const TapWeights<K, acc_t> tw(wt, g.C, c, cnt);
      const Vec sc = Vec::loadu(scale + c, cnt), sh = Vec::loadu(shift + c, cnt), mu = Vec::loadu(mean + c, cnt);
      Vec s_dz(acc_t(0)), s_dz_xmu(acc_t(0));
      conv_row<K>(image, g, oh, c, tw.w, cnt, ys);
      for (int64_t ow = 0; ow < g.OW; ++ow) {
        const Vec y = ys[ow];
        __builtin_prefetch(grow + (ow + kPrefetchPixels) * g.C + c);
        const Vec dz = load_acc<acc_t>(grow + ow * g.C + c, cnt) * silu_grad(at::vec::fmadd(y, sc, sh));
        s_dz = s_dz + dz;
        s_dz_xmu = at::vec::fmadd(dz, y - mu, s_dz_xmu);
      }
      store_lanes(row_dz + task * g.C + c, s_dz, cnt);
      store_lanes(row_dz_xmu + task * g.C + c, s_dz_xmu, cnt);
    }
  });
}

// Input rows per channels_last backward task; the dy rows they need (plus a
// halo of about K / S rows, recomputed by both neighbours) stay in L2.
constexpr int64_t kBackwardRows = 8;

inline int64_t floor_div(int64_t a, int64_t b) {
  return a >= 0 ? a / b : -((-a + b - 1) / b);
}

// dy of the output rows [ob, ot] a block of input rows reaches, with a zero
// margin: row oh - ob, column ow + kDyMargin, rows outside the image all zero.
template <typename acc_t>
struct DyBlock {
  int64_t ob, rows, cols, C;
  std::vector<acc_t> buf;
  acc_t* at(int64_t oh, int64_t ow) { return buf.data() + ((oh - ob) * cols + ow) * C; }
};

// Zeroes what the dy pass does not write: rows outside the image and the margin columns.
template <typename acc_t>
void zero_margins(DyBlock<acc_t>& dy, const Geometry& g) {
  const int64_t row_len = dy.cols * dy.C, margin = (g.K - 1) * dy.C;
  for (int64_t r = 0; r < dy.rows; ++r) {
    acc_t* row = dy.buf.data() + r * row_len;
    const int64_t oh = dy.ob + r;
    if (oh < 0 || oh >= g.OH) {
      std::fill(row, row + row_len, acc_t(0));
    } else {
      std::fill(row, row + margin, acc_t(0));
      std::fill(row + row_len - margin, row + row_len, acc_t(0));
    }
  }
}

// grad_x of input row ih at the columns iw = E, E + S, ...: tap kh counts when
// ih + PT - kh is a multiple of S and reads dy row (ih + PT - kh) / S; tap kw counts
// when E + PL - kw is and reads dy column (iw + PL - kw) / S. CE = (E + PL) % S picks
// the column taps at compile time. The zero margins of `dy` stand for the outputs
// outside the image.
template <int K, int S, int CE, typename scalar_t, typename acc_t>
void grad_input_pixels(DyBlock<acc_t>& dy, const Vectorized<acc_t>* w, int64_t ih, int64_t E, scalar_t* dst,
                       const Geometry& g, int64_t c, int64_t cnt) {
  using Vec = Vectorized<acc_t>;
  constexpr int M = kDyMargin<K>;
  const acc_t* rows[K];
  for (int kh = 0; kh < K; ++kh) {
    const int64_t t = ih + g.PT - kh;
    rows[kh] = t % S ? nullptr : dy.at(t / S, M + (E + g.PL - CE) / S) + c;
  }
  for (int64_t iw = E, m = 0; iw < g.W; iw += S, ++m) {
    Vec acc0(acc_t(0)), acc1(acc_t(0));
#pragma GCC unroll 5
    for (int kh = 0; kh < K; ++kh) {
      if (rows[kh] == nullptr) continue;
#pragma GCC unroll 5
      for (int kw = 0; kw < K; ++kw) {
        if ((CE - kw) % S) continue;
        Vec& acc = ((kh * K + kw) & 1) ? acc1 : acc0;
        acc = at::vec::fmadd(Vec::loadu(rows[kh] + (m + (CE - kw) / S) * g.C, cnt), w[kh * K + kw], acc);
      }
    }
    store_acc(dst + iw * g.C, acc0 + acc1, cnt);
  }
}

// grad_x and per-task grad_weight (task_gw[task][K * K][C]). Task t covers
// input rows [ih0, ih1) of image n; it owns output rows [ceil(ih0 / S), ceil(ih1 / S))
// for grad_weight (up to OH), which partition [0, OH) since OH <= ceil(H / S) (no side
// pads more than K / 2).
template <int K, typename scalar_t, typename acc_t>
void backward_nhwc(const scalar_t* grad, const scalar_t* x, const acc_t* wt, const acc_t* scale,
                   const acc_t* shift, const acc_t* coef_a, const acc_t* coef_b, const acc_t* coef_c,
                   scalar_t* grad_x, double* task_gw, const Geometry& geo) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  constexpr int M = kDyMargin<K>;
  const int64_t blocks = (geo.H + kBackwardRows - 1) / kBackwardRows;
  at::parallel_for(0, geo.N * blocks, 1, [&](int64_t begin, int64_t end) {
    const Geometry g = geo;  // a local copy: vector stores may alias anything
    const int64_t S = g.S, C = g.C;
    DyBlock<acc_t> dy{0, 0, g.OW + 2 * M, C, {}};
    std::vector<Vec> ys(g.OW);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks, ih0 = (task % blocks) * kBackwardRows;
      const int64_t ih1 = std::min(g.H, ih0 + kBackwardRows);
      dy.ob = floor_div(ih0 + g.PT - (K - 1), S);
      dy.rows = floor_div(ih1 - 1 + g.PT, S) - dy.ob + 1;
      dy.buf.resize(dy.rows * dy.cols * C);
      zero_margins(dy, g);
      const int64_t oh_lo = std::max<int64_t>(0, dy.ob), oh_hi = std::min(g.OH, dy.ob + dy.rows);
      const scalar_t* image = x + n * g.H * g.W * C;
      // dy for the rows the block reaches.
      for (int64_t c = 0; c < C; c += V) {
        const int64_t cnt = std::min(V, C - c);
        const TapWeights<K, acc_t> tw(wt, C, c, cnt);
        const Vec sc = Vec::loadu(scale + c, cnt), sh = Vec::loadu(shift + c, cnt);
        const Vec ca = Vec::loadu(coef_a + c, cnt), cb = Vec::loadu(coef_b + c, cnt), cc = Vec::loadu(coef_c + c, cnt);
        for (int64_t oh = oh_lo; oh < oh_hi; ++oh) {
          const scalar_t* grow = grad + (n * g.OH + oh) * g.OW * C;
          conv_row<K>(image, g, oh, c, tw.w, cnt, ys.data());
          for (int64_t ow = 0; ow < g.OW; ++ow) {
            const Vec y = ys[ow];
            __builtin_prefetch(grow + (ow + kPrefetchPixels) * C + c);
            const Vec dz = load_acc<acc_t>(grow + ow * C + c, cnt) * silu_grad(at::vec::fmadd(y, sc, sh));
            at::vec::fmadd(ca, dz, at::vec::fmadd(cb, y, cc)).store(dy.at(oh, ow + M) + c, cnt);
          }
        }
      }
      // grad_weight over the owned rows: sum of dy * x over the taps.
      const int64_t own_lo = (ih0 + S - 1) / S, own_hi = std::min(g.OH, (ih1 + S - 1) / S);
      double* gw_out = task_gw + task * K * K * C;
      for (int64_t c = 0; c < C; c += V) {
        const int64_t cnt = std::min(V, C - c);
        Vec gw[K * K];
        for (auto& v : gw) v = Vec(acc_t(0));
        for (int64_t oh = own_lo; oh < own_hi; ++oh)
          for (int64_t ow = 0; ow < g.OW; ++ow) {
            const Vec d = Vec::loadu(dy.at(oh, ow + M) + c, cnt);
            const Window win = window_of(g, oh, ow, c);
            auto add = [&](int kh, int kw, const scalar_t* p) {
              gw[kh * K + kw] = at::vec::fmadd(d, load_acc<acc_t>(p, cnt), gw[kh * K + kw]);
            };
            for_each_window_tap<K>(image, win, g, add);
          }
        for (int i = 0; i < K * K; ++i) store_lanes(gw_out + i * C + c, gw[i], cnt);
      }
      // grad_x[ih][iw] = sum of w[kh][kw] * dy[oh][ow] over ih = oh * S - PT + kh, iw = ow * S - PL + kw.
      for (int64_t c = 0; c < C; c += V) {
        const int64_t cnt = std::min(V, C - c);
        const TapWeights<K, acc_t> tw(wt, C, c, cnt);
        for (int64_t ih = ih0; ih < ih1; ++ih) {
          scalar_t* dst = grad_x + (n * g.H + ih) * g.W * C + c;
          if (S == 1) {
            grad_input_pixels<K, 1, 0>(dy, tw.w, ih, 0, dst, g, c, cnt);
            continue;
          }
          for (int64_t E = 0; E < 2; ++E) {
            if ((E + g.PL) % 2 == 0) {
              grad_input_pixels<K, 2, 0>(dy, tw.w, ih, E, dst, g, c, cnt);
            } else {
              grad_input_pixels<K, 2, 1>(dy, tw.w, ih, E, dst, g, c, cnt);
            }
          }
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------
// Ops

struct ConvInputs {
  Geometry g;
  Layout layout;
  at::ScalarType acc;
  at::Tensor weight;  // acc_t, [C][K * K] for NCHW, [K * K][C] for channels_last
};

ConvInputs prepare(const at::Tensor& x, const at::Tensor& weight, int64_t stride, at::OptionalIntArrayRef padding,
                   const char* op) {
  ConvInputs in{check_conv_inputs(x, weight, stride, padding, op), layout_of(x, op), acc_type_of(x.scalar_type()), {}};
  at::Tensor w = weight.to(in.acc).reshape({in.g.C, in.g.K * in.g.K});
  in.weight = in.layout == Layout::NHWC ? w.t().contiguous() : w.contiguous();
  return in;
}

at::Tensor channel_vector(const at::Tensor& v, const ConvInputs& in, const char* op, const char* name) {
  return acc_vector(v, {in.g.C}, in.acc, op, name);
}

at::Tensor output_like(const at::Tensor& x, const ConvInputs& in) {
  return empty_activation({in.g.N, in.g.C, in.g.OH, in.g.OW}, x.options(), memory_format(in.layout));
}

std::tuple<at::Tensor, at::Tensor> dwconv_bn_silu_stats(const at::Tensor& x, const at::Tensor& weight,
                                                        int64_t stride, at::OptionalIntArrayRef padding) {
  const char* op = "dwconv_bn_silu_stats";
  const ConvInputs in = prepare(x, weight, stride, padding, op);
  const Geometry& g = in.g;
  // Partial (mean, M2) per plane (NCHW) or per output row (channels_last), each over `part_count` values.
  const bool nchw = in.layout == Layout::NCHW;
  const int64_t parts = nchw ? g.N : g.N * g.OH;
  const double part_count = nchw ? double(g.OH * g.OW) : double(g.OW);
  std::vector<double> part_mean(parts * g.C), part_m2(parts * g.C);
  EFFNET_DISPATCH(x.scalar_type(), "dwconv_bn_silu_stats", [&] {
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const acc_t* pw = in.weight.const_data_ptr<acc_t>();
    with_kernel_shape(g, [&](auto k, auto s) {
      if (nchw) {
        stats_nchw<k.value, s.value>(px, pw, part_mean.data(), part_m2.data(), g);
      } else {
        stats_nhwc<k.value>(px, pw, part_mean.data(), part_m2.data(), g);
      }
    });
  });
  at::Tensor mean = at::empty({g.C}, x.options().dtype(at::kDouble));
  at::Tensor var = at::empty({g.C}, x.options().dtype(at::kDouble));
  double* pm = mean.data_ptr<double>();
  double* pv = var.data_ptr<double>();
  // Parts in order for every channel; channels innermost, so that the merges of
  // different channels (each a chain of divisions) overlap and the partials are read in order.
  std::vector<MeanM2> acc(g.C);
  for (int64_t p = 0; p < parts; ++p)
    for (int64_t c = 0; c < g.C; ++c) acc[c].merge(part_count, part_mean[p * g.C + c], part_m2[p * g.C + c]);
  for (int64_t c = 0; c < g.C; ++c) {
    pm[c] = acc[c].mean;
    pv[c] = acc[c].m2 / acc[c].count;
  }
  return {mean.to(in.acc), var.to(in.acc)};
}

at::Tensor dwconv_bn_silu_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                                  const at::Tensor& shift, int64_t stride, at::OptionalIntArrayRef padding) {
  const char* op = "dwconv_bn_silu_forward";
  const ConvInputs in = prepare(x, weight, stride, padding, op);
  const at::Tensor sc = channel_vector(scale, in, op, "scale"), sh = channel_vector(shift, in, op, "shift");
  at::Tensor out = output_like(x, in);
  EFFNET_DISPATCH(x.scalar_type(), "dwconv_bn_silu_forward", [&] {
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const acc_t* pw = in.weight.const_data_ptr<acc_t>();
    const acc_t *psc = sc.const_data_ptr<acc_t>(), *psh = sh.const_data_ptr<acc_t>();
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    with_kernel_shape(in.g, [&](auto k, auto s) {
      if (in.layout == Layout::NCHW) {
        forward_nchw<k.value, s.value>(px, pw, psc, psh, po, in.g);
      } else {
        forward_nhwc<k.value>(px, pw, psc, psh, po, in.g);
      }
    });
  });
  return out;
}

// Sums the [parts][C] partials over parts, in order, into a (C,) tensor of acc dtype.
at::Tensor sum_parts(const std::vector<double>& partials, int64_t parts, int64_t C, const at::Tensor& like,
                     at::ScalarType dtype) {
  at::Tensor out = at::zeros({C}, like.options().dtype(at::kDouble));
  double* po = out.data_ptr<double>();
  for (int64_t p = 0; p < parts; ++p)
    for (int64_t c = 0; c < C; ++c) po[c] += partials[p * C + c];
  return out.to(dtype);
}

std::tuple<at::Tensor, at::Tensor> dwconv_bn_silu_backward_reduce(const at::Tensor& grad_out, const at::Tensor& x,
                                                                  const at::Tensor& weight, const at::Tensor& scale,
                                                                  const at::Tensor& shift, const at::Tensor& mean,
                                                                  int64_t stride, at::OptionalIntArrayRef padding) {
  const char* op = "dwconv_bn_silu_backward_reduce";
  const ConvInputs in = prepare(x, weight, stride, padding, op);
  const Geometry& g = in.g;
  const at::Tensor sc = channel_vector(scale, in, op, "scale"), sh = channel_vector(shift, in, op, "shift");
  const at::Tensor mu = channel_vector(mean, in, op, "mean");
  const at::Tensor grad = like_input(grad_out, x, {g.N, g.C, g.OH, g.OW}, in.layout, op, "grad_out");
  const bool nchw = in.layout == Layout::NCHW;
  const int64_t parts = nchw ? g.N : g.N * g.OH;
  std::vector<double> part_dz(parts * g.C), part_dz_xmu(parts * g.C);
  EFFNET_DISPATCH(x.scalar_type(), "dwconv_bn_silu_backward_reduce", [&] {
    const scalar_t *px = x.const_data_ptr<scalar_t>(), *pg = grad.const_data_ptr<scalar_t>();
    const acc_t* pw = in.weight.const_data_ptr<acc_t>();
    const acc_t *psc = sc.const_data_ptr<acc_t>(), *psh = sh.const_data_ptr<acc_t>();
    const acc_t* pmu = mu.const_data_ptr<acc_t>();
    with_kernel_shape(g, [&](auto k, auto s) {
      if (nchw) {
        backward_reduce_nchw<k.value, s.value>(pg, px, pw, psc, psh, pmu, part_dz.data(), part_dz_xmu.data(), g);
      } else {
        backward_reduce_nhwc<k.value>(pg, px, pw, psc, psh, pmu, part_dz.data(), part_dz_xmu.data(), g);
      }
    });
  });
  return {sum_parts(part_dz, parts, g.C, x, in.acc), sum_parts(part_dz_xmu, parts, g.C, x, in.acc)};
}

std::tuple<at::Tensor, at::Tensor> dwconv_bn_silu_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                           const at::Tensor& weight, const at::Tensor& scale,
                                                           const at::Tensor& shift, const at::Tensor& coef_a,
                                                           const at::Tensor& coef_b, const at::Tensor& coef_c,
                                                           int64_t stride, at::OptionalIntArrayRef padding) {
  const char* op = "dwconv_bn_silu_backward";
  const ConvInputs in = prepare(x, weight, stride, padding, op);
  const Geometry& g = in.g;
  const at::Tensor sc = channel_vector(scale, in, op, "scale"), sh = channel_vector(shift, in, op, "shift");
  const at::Tensor ca = channel_vector(coef_a, in, op, "coef_a"), cb = channel_vector(coef_b, in, op, "coef_b");
  const at::Tensor cc = channel_vector(coef_c, in, op, "coef_c");
  const at::Tensor grad = like_input(grad_out, x, {g.N, g.C, g.OH, g.OW}, in.layout, op, "grad_out");
  at::Tensor grad_x = empty_activation(x.sizes(), x.options(), memory_format(in.layout));
  const bool nchw = in.layout == Layout::NCHW;
  const int64_t KK = g.K * g.K;
  // grad_weight partials: [N][C][K * K] per plane (NCHW) or [tasks][K * K][C] (channels_last).
  const int64_t parts = nchw ? g.N : g.N * ((g.H + kBackwardRows - 1) / kBackwardRows);
  std::vector<double> part_gw(parts * g.C * KK);
  EFFNET_DISPATCH(x.scalar_type(), "dwconv_bn_silu_backward", [&] {
    const scalar_t *px = x.const_data_ptr<scalar_t>(), *pg = grad.const_data_ptr<scalar_t>();
    const acc_t* pw = in.weight.const_data_ptr<acc_t>();
    const acc_t *psc = sc.const_data_ptr<acc_t>(), *psh = sh.const_data_ptr<acc_t>();
    const acc_t *pca = ca.const_data_ptr<acc_t>(), *pcb = cb.const_data_ptr<acc_t>(), *pcc = cc.const_data_ptr<acc_t>();
    scalar_t* pgx = grad_x.mutable_data_ptr<scalar_t>();
    with_kernel_shape(g, [&](auto k, auto s) {
      if (nchw) {
        backward_nchw<k.value, s.value>(pg, px, pw, psc, psh, pca, pcb, pcc, pgx, part_gw.data(), g);
      } else {
        backward_nhwc<k.value>(pg, px, pw, psc, psh, pca, pcb, pcc, pgx, part_gw.data(), g);
      }
    });
  });
  // Both partial layouts sum over the leading index to [C][K * K] or [K * K][C].
  at::Tensor gw = sum_parts(part_gw, parts, g.C * KK, x, at::kDouble);
  gw = nchw ? gw.view({g.C, KK}) : gw.view({KK, g.C}).t();
  return {grad_x, gw.reshape({g.C, 1, g.K, g.K}).to(weight.scalar_type()).contiguous()};
}

}  // namespace

TORCH_LIBRARY_IMPL(effnet_fast, CPU, m) {
  m.impl("dwconv_bn_silu_stats", &dwconv_bn_silu_stats);
  m.impl("dwconv_bn_silu_forward", &dwconv_bn_silu_forward);
  m.impl("dwconv_bn_silu_backward_reduce", &dwconv_bn_silu_backward_reduce);
  m.impl("dwconv_bn_silu_backward", &dwconv_bn_silu_backward);
}

}  // namespace effnet_fast::cpu
