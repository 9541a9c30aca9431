// BatchNorm + SiLU kernels for CPU tensors, on the output y of a convolution.
//
// Each op is one pass over memory: stats reads y once, forward reads y and
// writes out, backward_reduce reads grad_out and y, backward reads both and
// writes grad_y. The normalised pre-activation z is recomputed, never stored.
//
// NCHW: tasks are (n, c) planes, vectorised along H * W with the channel's
// parameters broadcast. Channels_last (the fast layout): tasks are runs of
// pixels, vectorised along C; the reductions walk blocks of kVecs vectors of
// channels over a chunk of pixels, so their accumulators stay in registers.
//
// Reductions keep partials per plane or per chunk of pixels (fixed by the
// shape, not by the thread count), merged in a fixed order: results do not
// depend on the number of threads.
#include "activation_cache.h"
#include "cpu_utils.h"

#include <vector>

namespace effnet_fast::cpu {
namespace {

struct Problem {
  int64_t N, C, HW;
  Layout layout;
  at::ScalarType acc;
};

Problem check_y(const at::Tensor& y, const char* op) {
  check_input(y, op);
  return {y.size(0), y.size(1), y.size(2) * y.size(3), layout_of(y, op), acc_type_of(y.scalar_type())};
}

// Elements per task: enough work per task to amortise scheduling, and float
// partial sums stay accurate.
constexpr int64_t kTaskElements = 1 << 15;
// Vectors of channels per channels_last reduction block: two accumulators and
// one parameter each, 12 registers.
constexpr int64_t kVecs = 4;
// Elements summed in acc_t before a plane's partials move to double.
constexpr int64_t kSumBlock = 4096;

// Pixels per channels_last reduction chunk; depends on the shape only.
int64_t chunk_pixels(int64_t C) {
  // At least 256 pixels: each chunk ends with per-channel work (conversions, divisions).
  return std::clamp<int64_t>(kTaskElements / C, 256, 1024);
}

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// ---------------------------------------------------------------------------
// Elementwise passes

// Calls fn(offset, count, channel) for every run of up to V elements of y that
// share their per-channel parameters' layout: channel(v) is the vector of the
// per-channel array v matching those elements (a broadcast in NCHW, a load in
// channels_last).
template <typename acc_t, typename Fn>
void for_each_vector(const Problem& p, Fn&& fn) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  if (p.layout == Layout::NCHW) {
    at::parallel_for(0, p.N * p.C, std::max<int64_t>(1, kTaskElements / p.HW), [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t c = plane % p.C, base = plane * p.HW;
        auto channel = [c](const acc_t* v) { return Vec(v[c]); };
        int64_t i = 0;
        for (; i + V <= p.HW; i += V) fn(base + i, V, channel);
        if (i < p.HW) fn(base + i, p.HW - i, channel);
      }
    });
    return;
  }
  at::parallel_for(0, p.N * p.HW, std::max<int64_t>(1, kTaskElements / p.C), [&](int64_t begin, int64_t end) {
    for (int64_t pixel = begin; pixel < end; ++pixel) {
      const int64_t base = pixel * p.C;
      int64_t c = 0;
      for (; c + V <= p.C; c += V) fn(base + c, V, [c](const acc_t* v) { return Vec::loadu(v + c); });
      if (c < p.C) {
        const int64_t cnt = p.C - c;
        fn(base + c, cnt, [c, cnt](const acc_t* v) { return Vec::loadu(v + c, cnt); });
      }
    }
  });
}

// ---------------------------------------------------------------------------
// NCHW reductions

// Reduces the elements [base, base + len) in blocks of kSumBlock: step(offset,
// cnt, s, q) adds a vector's terms to two accumulators (lanes past cnt must add
// zero); emit(count, S, Q) receives each block's sums in double.
template <typename acc_t, typename Step, typename Emit>
void reduce_run(int64_t base, int64_t len, Step&& step, Emit&& emit) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  for (int64_t start = 0; start < len; start += kSumBlock) {
    const int64_t end = std::min(len, start + kSumBlock);
    Vec s0(acc_t(0)), s1(acc_t(0)), q0(acc_t(0)), q1(acc_t(0));
    int64_t i = start;
    for (; i + 2 * V <= end; i += 2 * V) {  // two chains halve the add latency
      step(base + i, V, s0, q0);
      step(base + i + V, V, s1, q1);
    }
    for (; i < end; i += V) step(base + i, std::min(V, end - i), s0, q0);
    emit(double(end - start), lane_sum(s0 + s1), lane_sum(q0 + q1));
  }
}

// Per-plane mean and M2 of y ([N][C] partials over HW values each). Values are
// summed relative to the plane's first value, so a large common offset does
// not cancel.
template <typename scalar_t, typename acc_t>
void stats_nchw(const scalar_t* y, const Problem& p, double* part_mean, double* part_m2) {
  using Vec = Vectorized<acc_t>;
  at::parallel_for(0, p.N * p.C, std::max<int64_t>(1, kTaskElements / p.HW), [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const scalar_t* src = y + plane * p.HW;
      const acc_t first = static_cast<acc_t>(src[0]);
      const Vec shift(first);
      MeanM2 m;
      reduce_run<acc_t>(
          0, p.HW,
          [&](int64_t i, int64_t cnt, Vec& s, Vec& q) {
            const Vec d = keep_lanes(load_acc<acc_t>(src + i, cnt) - shift, cnt);
            s = s + d;
            q = at::vec::fmadd(d, d, q);
          },
          [&](double n, double sum, double sq) { m.merge(n, first + sum / n, std::max(0.0, sq - sum * sum / n)); });
      part_mean[plane] = m.mean;
      part_m2[plane] = m.m2;
    }
  });
}

// Per-plane sums of dz and dz * (y - mean), dz = grad * silu'(y * scale + shift).
template <typename scalar_t, typename acc_t>
void backward_reduce_nchw(const scalar_t* grad, const scalar_t* y, const acc_t* scale, const acc_t* shift,
                          const acc_t* mean, const Problem& p, double* part_dz, double* part_dz_ymu) {
  using Vec = Vectorized<acc_t>;
  at::parallel_for(0, p.N * p.C, std::max<int64_t>(1, kTaskElements / p.HW), [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t c = plane % p.C, base = plane * p.HW;
      const Vec sc(scale[c]), sh(shift[c]), mu(mean[c]);
      double sum_dz = 0, sum_dz_ymu = 0;
      reduce_run<acc_t>(
          base, p.HW,
          [&](int64_t i, int64_t cnt, Vec& s, Vec& q) {
            const Vec yv = load_acc<acc_t>(y + i, cnt);  // lanes past cnt: grad 0, so dz 0
            const Vec dz = load_acc<acc_t>(grad + i, cnt) * silu_grad(at::vec::fmadd(yv, sc, sh));
            s = s + dz;
            q = at::vec::fmadd(dz, yv - mu, q);
          },
          [&](double, double s, double q) {
            sum_dz += s;
            sum_dz_ymu += q;
          });
      part_dz[plane] = sum_dz;
      part_dz_ymu[plane] = sum_dz_ymu;
    }
  });
}

// ---------------------------------------------------------------------------
// Channels_last reductions

// Calls fn(c0, nc, vecs) for each block of up to kVecs vectors of channels
// [c0, c0 + nc); vecs (a std::integral_constant) is the block's vector count, so
// the loops over a block's vectors unroll and its accumulators stay in registers.
template <typename acc_t, typename Fn>
EFFNET_ALWAYS_INLINE void for_each_channel_block(int64_t C, Fn&& fn) {
  using std::integral_constant;
  constexpr int64_t V = Vectorized<acc_t>::size(), B = kVecs * V;
  static_assert(kVecs == 4);
  int64_t c0 = 0;
  for (; c0 + B <= C; c0 += B) fn(c0, B, integral_constant<int, 4>{});
  const int64_t rest = C - c0;
  switch ((rest + V - 1) / V) {
    case 0: return;
    case 1: return fn(c0, rest, integral_constant<int, 1>{});
    case 2: return fn(c0, rest, integral_constant<int, 2>{});
    case 3: return fn(c0, rest, integral_constant<int, 3>{});
    default: return fn(c0, rest, integral_constant<int, 4>{});
  }
}

// Calls fn(j, first channel of vector j within the block, lanes) for the NV vectors
// of a block of nc channels (only the last may be partial).
template <int NV, typename acc_t, typename Fn>
EFFNET_ALWAYS_INLINE void for_each_block_vector(int64_t nc, Fn&& fn) {
  constexpr int64_t V = Vectorized<acc_t>::size();
#pragma GCC unroll 4
  for (int j = 0; j < NV; ++j) fn(j, j * V, j + 1 < NV ? V : nc - j * V);
}

// Calls fn(task, p0, p1) in parallel for the chunks of pixels of a channels_last reduction.
template <typename Fn>
void for_each_chunk(const Problem& p, Fn&& fn) {
  const int64_t pixels = p.N * p.HW, chunk = chunk_pixels(p.C);
  at::parallel_for(0, ceil_div(pixels, chunk), 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) fn(task, task * chunk, std::min(pixels, (task + 1) * chunk));
  });
}

template <typename acc_t>
void store_lanes(double* dst, const Vectorized<acc_t>& v, int64_t cnt) {
  __at_align__ acc_t lanes[Vectorized<acc_t>::size()];
  v.store(lanes);
  for (int64_t l = 0; l < cnt; ++l) dst[l] = lanes[l];
}

// Per-chunk mean and M2 of y per channel ([chunks][C] partials), summed
// relative to the chunk's first pixel. The chunk is walked in runs of pixels;
// within a run each block of channels passes over the run's rows with its
// accumulators in registers, between runs they wait in (C,) arrays in L1.
// When one block holds every channel a run is the whole chunk. Otherwise a run
// is about 16 KiB of rows (kept in L1 for the passes) when y is cache-sized,
// and a single row when y comes from memory: block-by-block passes over many
// rows read each row in strided pieces, which DRAM streams poorly (one thread,
// B0's 77 MB 96x112 tensor: 3.3 ms instead of 4.8 ms).
template <typename scalar_t, typename acc_t>
void stats_nhwc(const scalar_t* y, const Problem& p, double* part_mean, double* part_m2) {
  using Vec = Vectorized<acc_t>;
  const int64_t C = p.C, row_bytes = C * int64_t(sizeof(scalar_t));
  const bool from_memory = p.N * p.HW * row_bytes > (16 << 20);
  const int64_t run = C <= kVecs * Vec::size()   ? chunk_pixels(C)
                      : from_memory              ? 1
                                                 : std::max<int64_t>(4, (16 << 10) / row_bytes);
  for_each_chunk(p, [&](int64_t task, int64_t p0, int64_t p1) {
    std::vector<acc_t> first(C), sum(C, acc_t(0)), sq(C, acc_t(0));
    for (int64_t c = 0; c < C; ++c) first[c] = static_cast<acc_t>(y[p0 * C + c]);
    for (int64_t r0 = p0; r0 < p1; r0 += run) {
      const int64_t r1 = std::min(p1, r0 + run);
      for_each_channel_block<acc_t>(C, [&](int64_t c0, int64_t nc, auto vecs) {
        constexpr int NV = decltype(vecs)::value;
        Vec shift[kVecs], s[kVecs], q[kVecs];
        for_each_block_vector<NV, acc_t>(nc, [&](int64_t j, int64_t cj, int64_t cnt) {
          shift[j] = Vec::loadu(first.data() + c0 + cj, cnt);
          s[j] = Vec::loadu(sum.data() + c0 + cj, cnt);
          q[j] = Vec::loadu(sq.data() + c0 + cj, cnt);
        });
        for (int64_t px = r0; px < r1; ++px) {
          const scalar_t* row = y + px * C + c0;
          for_each_block_vector<NV, acc_t>(nc, [&](int64_t j, int64_t cj, int64_t cnt) {
            const Vec d = load_acc<acc_t>(row + cj, cnt) - shift[j];
            s[j] = s[j] + d;
            q[j] = at::vec::fmadd(d, d, q[j]);
          });
        }
        for_each_block_vector<NV, acc_t>(nc, [&](int64_t j, int64_t cj, int64_t cnt) {
          s[j].store(sum.data() + c0 + cj, cnt);
          q[j].store(sq.data() + c0 + cj, cnt);
        });
      });
    }
    const double n = double(p1 - p0);
    for (int64_t c = 0; c < C; ++c) {
      part_mean[task * C + c] = first[c] + double(sum[c]) / n;
      part_m2[task * C + c] = std::max(0.0, double(sq[c]) - double(sum[c]) * double(sum[c]) / n);
    }
  });
}

// Per-chunk sums of dz and dz * (y - mean) per channel ([chunks][C] partials).
template <typename scalar_t, typename acc_t>
void backward_reduce_nhwc(const scalar_t* grad, const scalar_t* y, const acc_t* scale, const acc_t* shift,
                          const acc_t* mean, const Problem& p, double* part_dz, double* part_dz_ymu) {
  using Vec = Vectorized<acc_t>;
  const int64_t C = p.C;
  for_each_chunk(p, [&](int64_t task, int64_t p0, int64_t p1) {
    for_each_channel_block<acc_t>(C, [&](int64_t c0, int64_t nc, auto vecs) {
      constexpr int NV = decltype(vecs)::value;
      Vec sc[kVecs], sh[kVecs], mu[kVecs], s[kVecs], q[kVecs];
      for_each_block_vector<NV, acc_t>(nc, [&](int64_t j, int64_t cj, int64_t cnt) {
        sc[j] = Vec::loadu(scale + c0 + cj, cnt);
        sh[j] = Vec::loadu(shift + c0 + cj, cnt);
        mu[j] = Vec::loadu(mean + c0 + cj, cnt);
        s[j] = q[j] = Vec(acc_t(0));
      });
      for (int64_t px = p0; px < p1; ++px) {
        const int64_t base = px * C + c0;
        for_each_block_vector<NV, acc_t>(nc, [&](int64_t j, int64_t cj, int64_t cnt) {
          const Vec yv = load_acc<acc_t>(y + base + cj, cnt);
          const Vec dz = load_acc<acc_t>(grad + base + cj, cnt) * silu_grad(at::vec::fmadd(yv, sc[j], sh[j]));
          s[j] = s[j] + dz;
          q[j] = at::vec::fmadd(dz, yv - mu[j], q[j]);
        });
      }
      for_each_block_vector<NV, acc_t>(nc, [&](int64_t j, int64_t cj, int64_t cnt) {
        store_lanes(part_dz + task * C + c0 + cj, s[j], cnt);
        store_lanes(part_dz_ymu + task * C + c0 + cj, q[j], cnt);
      });
    });
  });
}

// ---------------------------------------------------------------------------
// Ops

// Partials per plane ([N][C], NCHW) or per chunk of pixels ([chunks][C], channels_last).
struct Partials {
  int64_t parts;
  std::vector<double> a, b;
  explicit Partials(const Problem& p)
      : parts(p.layout == Layout::NCHW ? p.N : ceil_div(p.N * p.HW, chunk_pixels(p.C))),
        a(parts * p.C),
        b(parts * p.C) {}
  // Values behind part `i` of a channel.
  double count(const Problem& p, int64_t i) const {
    if (p.layout == Layout::NCHW) return double(p.HW);
    const int64_t chunk = chunk_pixels(p.C);
    return double(std::min(p.N * p.HW, (i + 1) * chunk) - i * chunk);
  }
};

at::Tensor channel_tensor(const std::vector<double>& values, const at::Tensor& y, at::ScalarType acc) {
  at::Tensor out = at::empty({int64_t(values.size())}, y.options().dtype(at::kDouble));
  std::copy(values.begin(), values.end(), out.data_ptr<double>());
  return out.to(acc);
}

std::tuple<at::Tensor, at::Tensor> bn_silu_stats(const at::Tensor& y) {
  const char* op = "bn_silu_stats";
  const Problem p = check_y(y, op);
  Partials parts(p);
  EFFNET_DISPATCH(y.scalar_type(), "effnet_fast_bn_silu", [&] {
    const scalar_t* py = y.const_data_ptr<scalar_t>();
    if (p.layout == Layout::NCHW) {
      stats_nchw<scalar_t, acc_t>(py, p, parts.a.data(), parts.b.data());
    } else {
      stats_nhwc<scalar_t, acc_t>(py, p, parts.a.data(), parts.b.data());
    }
  });
  std::vector<double> mean(p.C), var(p.C);
  // Parts in order for every channel, channels innermost (see dwconv_bn_silu_stats).
  std::vector<MeanM2> m(p.C);
  for (int64_t i = 0; i < parts.parts; ++i) {
    const double count = parts.count(p, i);
    for (int64_t c = 0; c < p.C; ++c) m[c].merge(count, parts.a[i * p.C + c], parts.b[i * p.C + c]);
  }
  for (int64_t c = 0; c < p.C; ++c) {
    mean[c] = m[c].mean;
    var[c] = m[c].m2 / m[c].count;
  }
  return {channel_tensor(mean, y, p.acc), channel_tensor(var, y, p.acc)};
}

at::Tensor channel_vector(const at::Tensor& v, const Problem& p, const char* op, const char* name) {
  return acc_vector(v, {p.C}, p.acc, op, name);
}

at::Tensor output_like(const at::Tensor& y, const Problem& p) {
  return empty_activation(y.sizes(), y.options(), memory_format(p.layout));
}

at::Tensor bn_silu_forward(const at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift) {
  const char* op = "bn_silu_forward";
  const Problem p = check_y(y, op);
  const at::Tensor sc = channel_vector(scale, p, op, "scale"), sh = channel_vector(shift, p, op, "shift");
  at::Tensor out = output_like(y, p);
  EFFNET_DISPATCH(y.scalar_type(), "effnet_fast_bn_silu", [&] {
    const scalar_t* py = y.const_data_ptr<scalar_t>();
    const acc_t *psc = sc.const_data_ptr<acc_t>(), *psh = sh.const_data_ptr<acc_t>();
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    for_each_vector<acc_t>(p, [&](int64_t i, int64_t cnt, auto channel) {
      const auto z = at::vec::fmadd(load_acc<acc_t>(py + i, cnt), channel(psc), channel(psh));
      store_acc(po + i, silu(z), cnt);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> bn_silu_backward_reduce(const at::Tensor& grad_out, const at::Tensor& y,
                                                           const at::Tensor& scale, const at::Tensor& shift,
                                                           const at::Tensor& mean) {
  const char* op = "bn_silu_backward_reduce";
  const Problem p = check_y(y, op);
  const at::Tensor sc = channel_vector(scale, p, op, "scale"), sh = channel_vector(shift, p, op, "shift");
  const at::Tensor mu = channel_vector(mean, p, op, "mean");
  const at::Tensor grad = like_input(grad_out, y, y.sizes(), p.layout, op, "grad_out");
  Partials parts(p);
  EFFNET_DISPATCH(y.scalar_type(), "effnet_fast_bn_silu", [&] {
    const scalar_t *py = y.const_data_ptr<scalar_t>(), *pg = grad.const_data_ptr<scalar_t>();
    const acc_t *psc = sc.const_data_ptr<acc_t>(), *psh = sh.const_data_ptr<acc_t>();
    const acc_t* pmu = mu.const_data_ptr<acc_t>();
    if (p.layout == Layout::NCHW) {
      backward_reduce_nchw<scalar_t, acc_t>(pg, py, psc, psh, pmu, p, parts.a.data(), parts.b.data());
    } else {
      backward_reduce_nhwc<scalar_t, acc_t>(pg, py, psc, psh, pmu, p, parts.a.data(), parts.b.data());
    }
  });
  std::vector<double> sum_dz(p.C, 0.0), sum_dz_ymu(p.C, 0.0);
  for (int64_t i = 0; i < parts.parts; ++i)
    for (int64_t c = 0; c < p.C; ++c) {
      sum_dz[c] += parts.a[i * p.C + c];
      sum_dz_ymu[c] += parts.b[i * p.C + c];
    }
  return {channel_tensor(sum_dz, y, p.acc), channel_tensor(sum_dz_ymu, y, p.acc)};
}

at::Tensor bn_silu_backward(const at::Tensor& grad_out, const at::Tensor& y, const at::Tensor& scale,
                            const at::Tensor& shift, const at::Tensor& coef_a, const at::Tensor& coef_b,
                            const at::Tensor& coef_c) {
  const char* op = "bn_silu_backward";
  const Problem p = check_y(y, op);
  const at::Tensor sc = channel_vector(scale, p, op, "scale"), sh = channel_vector(shift, p, op, "shift");
  const at::Tensor ca = channel_vector(coef_a, p, op, "coef_a"), cb = channel_vector(coef_b, p, op, "coef_b");
  const at::Tensor cc = channel_vector(coef_c, p, op, "coef_c");
  const at::Tensor grad = like_input(grad_out, y, y.sizes(), p.layout, op, "grad_out");
  at::Tensor grad_y = output_like(y, p);
  EFFNET_DISPATCH(y.scalar_type(), "effnet_fast_bn_silu", [&] {
    const scalar_t *py = y.const_data_ptr<scalar_t>(), *pg = grad.const_data_ptr<scalar_t>();
    const acc_t *psc = sc.const_data_ptr<acc_t>(), *psh = sh.const_data_ptr<acc_t>();
    const acc_t *pca = ca.const_data_ptr<acc_t>(), *pcb = cb.const_data_ptr<acc_t>(), *pcc = cc.const_data_ptr<acc_t>();
    scalar_t* pgy = grad_y.mutable_data_ptr<scalar_t>();
    for_each_vector<acc_t>(p, [&](int64_t i, int64_t cnt, auto channel) {
      const auto yv = load_acc<acc_t>(py + i, cnt);
      const auto dz = load_acc<acc_t>(pg + i, cnt) * silu_grad(at::vec::fmadd(yv, channel(psc), channel(psh)));
      store_acc(pgy + i, at::vec::fmadd(channel(pca), dz, at::vec::fmadd(channel(pcb), yv, channel(pcc))), cnt);
    });
  });
  return grad_y;
}

}  // namespace

TORCH_LIBRARY_IMPL(effnet_fast, CPU, m) {
  m.impl("bn_silu_stats", &bn_silu_stats);
  m.impl("bn_silu_forward", &bn_silu_forward);
  m.impl("bn_silu_backward_reduce", &bn_silu_backward_reduce);
  m.impl("bn_silu_backward", &bn_silu_backward);
}

}  // namespace effnet_fast::cpu
