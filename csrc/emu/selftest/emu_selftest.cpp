// Checks that the host emulation (csrc/emu/cuda_emu.h) runs correct kernels
// correctly and reports broken ones. Built and run by tests/test_cuda_build.py:
//   g++ -std=c++20 -I csrc/emu csrc/emu/selftest/emu_selftest.cpp csrc/emu/cuda_emu.cpp
// Prints one line per case; exits non-zero if any case fails.
#include <cmath>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda_emu.h"

namespace {

// Sum of the block's thread indices through shared memory.
__global__ void block_sum(float* out) {
  float* smem = reinterpret_cast<float*>(cuda_emu::dynamic_shared_memory());
  smem[threadIdx.x] = float(threadIdx.x);
  __syncthreads();
  for (unsigned half = blockDim.x / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) smem[threadIdx.x] += smem[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = smem[0];
}

// Reads a neighbour's slot without waiting for it to be written.
__global__ void missing_barrier(float* out) {
  float* smem = reinterpret_cast<float*>(cuda_emu::dynamic_shared_memory());
  smem[threadIdx.x] = 1.0f;
  out[threadIdx.x] = smem[(threadIdx.x + 1) % blockDim.x];
}

__global__ void divergent_barrier(float*) {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
}

__global__ void barrier_after_exit(float*) {
  if (threadIdx.x == 0) return;
  __syncthreads();
}

// Warp sum of the lane indices with butterfly shuffles.
__global__ void warp_sum(float* out) {
  float v = float(threadIdx.x % 32);
  for (int mask = 16; mask > 0; mask /= 2) v += __shfl_xor_sync(0xffffffffu, v, mask);
  out[threadIdx.x] = v;
}

__global__ void partial_mask_shuffle(float* out) {
  out[threadIdx.x] = __shfl_down_sync(0x0000ffffu, 1.0f, 1);
}

__global__ void count_threads(float* out) {
  atomicAdd(out, 1.0f);
}

__global__ void shared_overflow(float*) {
  float* smem = reinterpret_cast<float*>(cuda_emu::dynamic_shared_memory());
  smem[threadIdx.x + 1] = 0.0f;  // one float past a blockDim.x-float buffer
}

int failures = 0;

void report(const char* name, bool ok, const std::string& detail = "") {
  std::printf("%-24s %s %s\n", name, ok ? "ok" : "FAIL", detail.c_str());
  failures += ok ? 0 : 1;
}

// Runs a launch that must raise an error mentioning `expected`.
template <class Launch>
void expect_error(const char* name, const std::string& expected, Launch&& launch) {
  try {
    launch();
    report(name, false, "no error raised");
  } catch (const std::runtime_error& e) {
    const std::string what = e.what();
    report(name, what.find(expected) != std::string::npos, what);
  }
}

}  // namespace

int main() {
  std::vector<float> out(256, 0.0f);

  cuda_emu::launch(block_sum, dim3(3), dim3(128), 128 * sizeof(float), out.data());
  report("block_sum", out[0] == 127 * 128 / 2 && out[2] == out[0]);

  cuda_emu::launch(missing_barrier, dim3(1), dim3(64), 64 * sizeof(float), out.data());
  int poisoned = 0;
  for (int i = 0; i < 64; ++i) poisoned += std::isnan(out[i]) ? 1 : 0;
  report("missing_barrier_reads_nan", poisoned > 0, std::to_string(poisoned) + " of 64 reads saw poison");

  cuda_emu::launch(warp_sum, dim3(1), dim3(64), 0, out.data());
  report("warp_sum", out[0] == 496 && out[63] == 496);

  out[0] = 0.0f;
  cuda_emu::launch(count_threads, dim3(4, 2), dim3(32, 2), 0, out.data());
  report("atomic_add", out[0] == 512);

  expect_error("divergent_barrier", "different __syncthreads",
               [&] { cuda_emu::launch(divergent_barrier, dim3(1), dim3(64), 0, out.data()); });
  expect_error("barrier_after_exit", "exited",
               [&] { cuda_emu::launch(barrier_after_exit, dim3(1), dim3(64), 0, out.data()); });
  expect_error("partial_mask_shuffle", "mask",
               [&] { cuda_emu::launch(partial_mask_shuffle, dim3(1), dim3(32), 0, out.data()); });
  expect_error("shared_overflow", "past the end",
               [&] { cuda_emu::launch(shared_overflow, dim3(1), dim3(32), 32 * sizeof(float), out.data()); });
  expect_error("too_many_threads", "not a valid CUDA block",
               [&] { cuda_emu::launch(count_threads, dim3(1), dim3(2048), 0, out.data()); });
  expect_error("too_much_shared_memory", "dynamic shared memory",
               [&] { cuda_emu::launch(count_threads, dim3(1), dim3(32), 64 * 1024, out.data()); });
  return failures == 0 ? 0 : 1;
}
