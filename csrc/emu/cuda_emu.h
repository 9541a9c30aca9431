// Host emulation of the part of the CUDA execution model this project's kernels
// use, so that g++ compiles the kernel headers of csrc/cuda unchanged and the
// tests run them on the CPU (see docs/CUDA_EMULATION.md).
//
// cuda_emu::launch(kernel, grid, block, smem_bytes, args...) runs every block of
// the grid, one after another; inside a block every CUDA thread is a fiber
// with its own stack (a hand-written stack switch on x86-64, ucontext elsewhere).
// A fiber runs until it reaches a barrier, then the next one runs:
//   __syncthreads()     waits until every thread of the block has arrived at the
//                       same call site (divergent or partial barriers are errors);
//   __shfl_*_sync()     write the lane's value, wait for the whole warp, read the
//                       partner's value (the mask must name the whole warp);
//   atomicAdd()         a plain read-modify-write (fibers never interleave in it).
// Dynamic shared memory (cuda_emu::dynamic_shared_memory(), 48 KiB at most) is
// filled with 0xFF bytes (NaN for float and double) at the start of every block,
// and a guard zone after it is checked at the end. Threads run in increasing
// order until a barrier releases, then in decreasing order, alternately, so a
// missing barrier reads poison or stale values whichever side writes first.
// Errors (deadlock, divergent barrier, bad launch) throw std::runtime_error
// from launch().
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <source_location>
#include <tuple>
#include <type_traits>
#include <utility>

// The kernels' #pragma unroll is an nvcc hint.
#pragma GCC diagnostic ignored "-Wunknown-pragmas"

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

namespace cuda_emu {

constexpr int kWarpSize = 32;
constexpr std::size_t kMaxDynamicSharedBytes = 48 * 1024;
constexpr std::size_t kExchangeBytes = 16;  // largest value a shuffle moves

namespace detail {
const dim3& thread_idx();
const dim3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();
unsigned char* shared_memory();
int lane_id();
// The warp's exchange slots for its next shuffle. Two sets alternate: a lane
// can only write a set again after the next barrier, which waits for every lane
// to have read it, so one barrier per shuffle suffices.
unsigned char* next_exchange_slots();
void sync_block(const std::source_location& where);
void sync_warp(unsigned mask, const std::source_location& where);
void launch_grid(dim3 grid, dim3 block, std::size_t smem_bytes, const std::function<void()>& body);

template <class T, class SrcLane>
T exchange(unsigned mask, T value, SrcLane src_lane, const std::source_location& where) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= kExchangeBytes, "unsupported shuffle type");
  const int lane = lane_id();
  unsigned char* slots = next_exchange_slots();
  std::memcpy(slots + lane * kExchangeBytes, &value, sizeof(T));
  sync_warp(mask, where);  // every lane has published its value
  T result;
  std::memcpy(&result, slots + src_lane(lane) * kExchangeBytes, sizeof(T));
  return result;
}
}  // namespace detail

inline unsigned char* dynamic_shared_memory() {
  return detail::shared_memory();
}

// Runs kernel(args...) over the grid; the arguments are converted to the
// kernel's parameter types once, as a CUDA launch copies them.
template <class... Params, class... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t smem_bytes, Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "wrong number of kernel arguments");
  const std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  detail::launch_grid(grid, block, smem_bytes, [&] { std::apply(kernel, params); });
}

}  // namespace cuda_emu

#define threadIdx (::cuda_emu::detail::thread_idx())
#define blockIdx (::cuda_emu::detail::block_idx())
#define blockDim (::cuda_emu::detail::block_dim())
#define gridDim (::cuda_emu::detail::grid_dim())
#define warpSize (::cuda_emu::kWarpSize)

inline void __syncthreads(const std::source_location& where = std::source_location::current()) {
  ::cuda_emu::detail::sync_block(where);
}

inline void __syncwarp(unsigned mask = 0xffffffffu,
                       const std::source_location& where = std::source_location::current()) {
  ::cuda_emu::detail::sync_warp(mask, where);
}

template <class T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize,
              const std::source_location& where = std::source_location::current()) {
  return ::cuda_emu::detail::exchange(
      mask, var, [&](int lane) { return lane / width * width + src_lane % width; }, where);
}

template <class T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                   const std::source_location& where = std::source_location::current()) {
  return ::cuda_emu::detail::exchange(
      mask, var,
      [&](int lane) {
        const int src = lane + int(delta);
        return src < lane / width * width + width ? src : lane;
      },
      where);
}

template <class T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                 const std::source_location& where = std::source_location::current()) {
  return ::cuda_emu::detail::exchange(
      mask, var,
      [&](int lane) {
        const int src = lane - int(delta);
        return src >= lane / width * width ? src : lane;
      },
      where);
}

template <class T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize,
                  const std::source_location& where = std::source_location::current()) {
  return ::cuda_emu::detail::exchange(
      mask, var,
      [&](int lane) {
        const int src = lane ^ lane_mask;
        return src < lane / width * width + width ? src : lane;
      },
      where);
}

// Fibers switch only at barriers, so a read-modify-write is atomic here.
template <class T>
T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}

template <class T>
T __ldg(const T* p) {
  return *p;
}

inline void __threadfence() {}
