// The zero padding of the depthwise conv ops (csrc/op_schemas.h), shared by the CPU and
// CUDA kernels: the schemas' optional `padding` (top, bottom, left, right) checked, or
// k / 2 on every side when it is None. Each side is at most k / 2, so a kernel reading
// through zero padding of k / 2 (or bounds checks against H and W) covers every case;
// TF 'same' padding pads one less at the top / left for stride 2 and even sizes.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/OptionalArrayRef.h>

#include <cstdint>

namespace effnet_fast {

struct DwPadding {
  int64_t top, bottom, left, right;
  int64_t out_h, out_w;
};

inline DwPadding dw_padding(at::OptionalIntArrayRef padding, int64_t k, int64_t stride, int64_t H, int64_t W,
                            const char* op) {
  const int64_t half = k / 2;
  DwPadding p{half, half, half, half, 0, 0};
  if (padding.has_value()) {
    const at::IntArrayRef pads = *padding;
    TORCH_CHECK(pads.size() == 4, op, ": padding must be (top, bottom, left, right), got ", pads);
    for (int64_t v : pads) {
      TORCH_CHECK(0 <= v && v <= half, op, ": padding ", pads, " out of range: each side must be in [0, k // 2 = ",
                  half, "]");
    }
    p = {pads[0], pads[1], pads[2], pads[3], 0, 0};
  }
  TORCH_CHECK(H + p.top + p.bottom >= k && W + p.left + p.right >= k, op, ": a ", H, "x", W, " input padded by (",
              p.top, ", ", p.bottom, ", ", p.left, ", ", p.right, ") is smaller than the ", k, "x", k, " kernel");
  p.out_h = (H + p.top + p.bottom - k) / stride + 1;
  p.out_w = (W + p.left + p.right - k) / stride + 1;
  return p;
}

}  // namespace effnet_fast
