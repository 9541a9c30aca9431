// Squeeze-excitation kernels for CPU tensors: the pool, the channel-wise scale
// and the gate gradient. Each is one memory-bound pass over x, vectorized along
// the contiguous dimension (H*W for NCHW, C for channels_last) and parallel over
// independent (n, c) planes or (n, channel block) slices.
#include "activation_cache.h"
#include "cpu_utils.h"

namespace effnet_fast::cpu {
namespace {

// Channels of one channels_last reduction task: 4 vectors of float keep 4
// independent add chains and read whole cache lines from each pixel.
constexpr int64_t kChannelBlock = 64;
// Pixels summed in acc_t before the partial sums are added in double.
constexpr int64_t kPixelBlock = 256;

// sum over the plane of a[i] (* b[i] when b is given), in double.
template <typename scalar_t, typename acc_t>
double plane_sum(const scalar_t* a, const scalar_t* b, int64_t len) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  double total = 0;
  for (int64_t start = 0; start < len; start += kPixelBlock * V) {
    const int64_t end = std::min(len, start + kPixelBlock * V);
    Vec s0(acc_t(0)), s1(acc_t(0));
    int64_t i = start;
    for (; i + 2 * V <= end; i += 2 * V) {
      Vec a0 = load_acc<acc_t>(a + i), a1 = load_acc<acc_t>(a + i + V);
      if (b) {
        s0 = at::vec::fmadd(a0, load_acc<acc_t>(b + i), s0);
        s1 = at::vec::fmadd(a1, load_acc<acc_t>(b + i + V), s1);
      } else {
        s0 = s0 + a0;
        s1 = s1 + a1;
      }
    }
    for (; i < end; i += V) {
      const int64_t n = std::min(V, end - i);
      Vec a0 = load_acc<acc_t>(a + i, n);
      s0 = b ? at::vec::fmadd(a0, load_acc<acc_t>(b + i, n), s0) : s0 + a0;
    }
    total += lane_sum(s0 + s1);
  }
  return total;
}

// Channels_last: out[n, c] = sum over pixels of a (* b), for c in [c0, c0 + nc).
template <typename scalar_t, typename acc_t>
void pixel_sums(const scalar_t* a, const scalar_t* b, int64_t pixels, int64_t C, int64_t c0, int64_t nc,
                double* out) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  constexpr int64_t kVecs = kChannelBlock / V;
  std::fill(out, out + nc, 0.0);
  for (int64_t p0 = 0; p0 < pixels; p0 += kPixelBlock) {
    const int64_t p1 = std::min(pixels, p0 + kPixelBlock);
    Vec acc[kVecs];
    for (auto& v : acc) v = Vec(acc_t(0));
    if (nc == kChannelBlock) {  // whole block: fixed trip count, no masks
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t base = p * C + c0;
        for (int64_t j = 0; j < kVecs; ++j) {
          const Vec av = load_acc<acc_t>(a + base + j * V);
          acc[j] = b ? at::vec::fmadd(av, load_acc<acc_t>(b + base + j * V), acc[j]) : acc[j] + av;
        }
      }
    } else {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t base = p * C + c0;
        for (int64_t j = 0; j < kVecs && j * V < nc; ++j) {
          const int64_t n = std::min(V, nc - j * V);
          const Vec av = load_acc<acc_t>(a + base + j * V, n);
          acc[j] = b ? at::vec::fmadd(av, load_acc<acc_t>(b + base + j * V, n), acc[j]) : acc[j] + av;
        }
      }
    }
    for (int64_t j = 0; j < kVecs && j * V < nc; ++j) {
      __at_align__ acc_t lanes[V];
      acc[j].store(lanes);
      for (int64_t l = 0; l < V && j * V + l < nc; ++l) out[j * V + l] += lanes[l];
    }
  }
}

// (N, C) sums over H and W of a (* b when defined), scaled by `factor`.
at::Tensor channel_sums(const at::Tensor& a, const at::Tensor& b, double factor, Layout layout) {
  const int64_t N = a.size(0), C = a.size(1), HW = a.size(2) * a.size(3);
  const auto acc = acc_type_of(a.scalar_type());
  at::Tensor out = at::empty({N, C}, a.options().dtype(acc));
  EFFNET_DISPATCH(a.scalar_type(), "effnet_fast_se_sums", [&] {
    const scalar_t* pa = a.const_data_ptr<scalar_t>();
    const scalar_t* pb = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
    acc_t* po = out.mutable_data_ptr<acc_t>();
    if (layout == Layout::NCHW) {
      at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
        for (int64_t plane = begin; plane < end; ++plane) {
          const double s = plane_sum<scalar_t, acc_t>(pa + plane * HW, pb ? pb + plane * HW : nullptr, HW);
          po[plane] = static_cast<acc_t>(s * factor);
        }
      });
    } else {
      const int64_t blocks = (C + kChannelBlock - 1) / kChannelBlock;
      at::parallel_for(0, N * blocks, 1, [&](int64_t begin, int64_t end) {
        double sums[kChannelBlock];
        for (int64_t task = begin; task < end; ++task) {
          const int64_t n = task / blocks, c0 = (task % blocks) * kChannelBlock;
          const int64_t nc = std::min(kChannelBlock, C - c0);
          const int64_t offset = n * HW * C;
          pixel_sums<scalar_t, acc_t>(pa + offset, pb ? pb + offset : nullptr, HW, C, c0, nc, sums);
          for (int64_t j = 0; j < nc; ++j) po[n * C + c0 + j] = static_cast<acc_t>(sums[j] * factor);
        }
      });
    }
  });
  return out;
}

at::Tensor se_pool(const at::Tensor& x_in) {
  const char* op = "se_pool";
  check_input(x_in, op);
  const Layout layout = layout_of(x_in, op);
  return channel_sums(x_in, at::Tensor(), 1.0 / double(x_in.size(2) * x_in.size(3)), layout);
}

at::Tensor se_gate_grad(const at::Tensor& grad_out, const at::Tensor& x_in) {
  const char* op = "se_gate_grad";
  check_input(x_in, op);
  const Layout layout = layout_of(x_in, op);
  const at::Tensor g = like_input(grad_out, x_in, x_in.sizes(), layout, op, "grad_out");
  return channel_sums(g, x_in, 1.0, layout);
}

at::Tensor se_scale(const at::Tensor& x, const at::Tensor& gate_in, const std::optional<at::Tensor>& bias_in) {
  const char* op = "se_scale";
  check_input(x, op);
  const Layout layout = layout_of(x, op);
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const auto acc = acc_type_of(x.scalar_type());
  const at::Tensor gate = acc_vector(gate_in, {N, C}, acc, op, "gate");
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  const at::Tensor bias = has_bias ? acc_vector(*bias_in, {N, C}, acc, op, "bias") : at::Tensor();
  at::Tensor out = empty_activation(x.sizes(), x.options(), memory_format(layout));
  EFFNET_DISPATCH(x.scalar_type(), "effnet_fast_se_scale", [&] {
    using Vec = Vectorized<acc_t>;
    constexpr int64_t V = Vec::size();
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const acc_t* pg = gate.const_data_ptr<acc_t>();
    const acc_t* pb = has_bias ? bias.const_data_ptr<acc_t>() : nullptr;
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    if (layout == Layout::NCHW) {
      at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
        for (int64_t plane = begin; plane < end; ++plane) {
          const Vec g(pg[plane]), b(pb ? pb[plane] : acc_t(0));
          const scalar_t* src = px + plane * HW;
          scalar_t* dst = po + plane * HW;
          for (int64_t i = 0; i < HW; i += V) {
            const int64_t n = std::min(V, HW - i);
            store_acc(dst + i, at::vec::fmadd(load_acc<acc_t>(src + i, n), g, b), n);
          }
        }
      });
    } else {
      // Tasks of whole pixels; each pixel reads the (n, :) gate and bias rows from L1.
      const int64_t pixels = N * HW;
      at::parallel_for(0, pixels, std::max<int64_t>(1, 4096 / C), [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p) {
          const int64_t n = p / HW;
          const acc_t* g = pg + n * C;
          const acc_t* b = pb ? pb + n * C : nullptr;
          const scalar_t* src = px + p * C;
          scalar_t* dst = po + p * C;
          for (int64_t c = 0; c < C; c += V) {
            const int64_t cnt = std::min(V, C - c);
            const Vec bv = b ? Vec::loadu(b + c, cnt) : Vec(acc_t(0));
            store_acc(dst + c, at::vec::fmadd(load_acc<acc_t>(src + c, cnt), Vec::loadu(g + c, cnt), bv), cnt);
          }
        }
      });
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(effnet_fast, CPU, m) {
  m.impl("se_pool", &se_pool);
  m.impl("se_scale", &se_scale);
  m.impl("se_gate_grad", &se_gate_grad);
}

}  // namespace effnet_fast::cpu
