// The scheduler behind csrc/emu/cuda_emu.h: blocks run one after another, the
// threads of a block as fibers switched at barriers.
#include "cuda_emu.h"

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include <algorithm>
#include <exception>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace cuda_emu::detail {
namespace {

constexpr std::size_t kStackBytes = 256 * 1024;
constexpr std::size_t kGuardBytes = 64;
constexpr unsigned char kPoison = 0xFF;
constexpr unsigned char kGuard = 0xA5;
constexpr int kMaxThreadsPerBlock = 1024;
constexpr unsigned kMaxGridYZ = 65535;

enum class State { Runnable, AtBlockBarrier, AtWarpBarrier, Done };

#if defined(__x86_64__)
// A fiber switch saves the callee-saved registers on the current stack and
// resumes another stack: a few nanoseconds, where swapcontext also makes a
// signal-mask system call.
struct Context {
  void* sp = nullptr;
};
extern "C" void cuda_emu_switch_stack(void** save_sp, void* resume_sp);
asm(R"(
  .text
  .globl cuda_emu_switch_stack
  .hidden cuda_emu_switch_stack
  .type cuda_emu_switch_stack, @function
cuda_emu_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuda_emu_switch_stack, .-cuda_emu_switch_stack
)");

void switch_context(Context& from, Context& to) {
  cuda_emu_switch_stack(&from.sp, to.sp);
}

// Prepares a stack whose first switch "returns" into entry, aligned as after a call.
void make_context(Context& c, char* stack, std::size_t bytes, void (*entry)()) {
  auto top = reinterpret_cast<std::uintptr_t>(stack + bytes) & ~std::uintptr_t(15);
  auto* slots = reinterpret_cast<void**>(top);
  slots[-1] = nullptr;                             // entry never returns
  slots[-2] = reinterpret_cast<void*>(entry);      // popped by ret
  for (int i = 3; i <= 8; ++i) slots[-i] = nullptr;  // rbp, rbx, r12-r15
  c.sp = slots - 8;
}
#else
struct Context {
  ucontext_t uc;
};

void switch_context(Context& from, Context& to) {
  swapcontext(&from.uc, &to.uc);
}

void make_context(Context& c, char* stack, std::size_t bytes, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
#endif

struct Fiber {
  Context context;
  dim3 index;
  State state = State::Runnable;
  std::source_location where;
  unsigned mask = 0;
  unsigned shuffles = 0;  // picks the exchange slot set
};

// Everything about the block being run; one per OS thread that launches.
struct BlockRun {
  dim3 grid, block, block_index;
  std::size_t smem_bytes = 0;
  std::vector<unsigned char> smem;  // smem_bytes + guard, 16-byte aligned start below
  std::vector<unsigned char> exchange;
  std::vector<Fiber> fibers;
  std::vector<std::unique_ptr<char[]>> stacks;
  Context scheduler;
  int current = -1;
  const std::function<void()>* body = nullptr;
  std::string error;
};

thread_local BlockRun* active = nullptr;

BlockRun& run() {
  if (active == nullptr) throw std::runtime_error("cuda_emu: device built-in used outside a kernel launch");
  return *active;
}

Fiber& current_fiber() {
  BlockRun& r = run();
  return r.fibers[r.current];
}

unsigned char* aligned_smem(BlockRun& r) {
  auto p = reinterpret_cast<std::uintptr_t>(r.smem.data());
  return r.smem.data() + ((16 - p % 16) % 16);
}

std::string location(const std::source_location& w) {
  return std::string(w.file_name()) + ":" + std::to_string(w.line());
}

bool same_site(const std::source_location& a, const std::source_location& b) {
  return a.line() == b.line() && a.column() == b.column() && std::strcmp(a.file_name(), b.file_name()) == 0;
}

// Switches from the running fiber back to the scheduler.
void yield(BlockRun& r) {
  switch_context(r.fibers[r.current].context, r.scheduler);
}

void fiber_main() {
  BlockRun& r = *active;
  try {
    (*r.body)();
  } catch (const std::exception& e) {
    if (r.error.empty()) r.error = e.what();
  }
  r.fibers[r.current].state = State::Done;
  yield(r);  // never resumed
}

void validate_launch(dim3 grid, dim3 block, std::size_t smem_bytes) {
  const long threads = long(block.x) * block.y * block.z;
  std::ostringstream why;
  if (threads < 1 || threads > kMaxThreadsPerBlock || block.z > 64) {
    why << "block (" << block.x << ", " << block.y << ", " << block.z << ") is not a valid CUDA block";
  } else if (grid.x < 1 || grid.y < 1 || grid.z < 1 || grid.y > kMaxGridYZ || grid.z > kMaxGridYZ ||
             grid.x > 0x7fffffffu) {
    why << "grid (" << grid.x << ", " << grid.y << ", " << grid.z << ") is not a valid CUDA grid";
  } else if (smem_bytes > kMaxDynamicSharedBytes) {
    why << smem_bytes << " bytes of dynamic shared memory exceed the default limit of " << kMaxDynamicSharedBytes;
  }
  if (!why.str().empty()) throw std::runtime_error("cuda_emu: bad launch: " + why.str());
}

void start_block(BlockRun& r) {
  std::fill(r.smem.begin(), r.smem.end(), kPoison);
  unsigned char* guard = aligned_smem(r) + r.smem_bytes;
  std::fill(guard, guard + kGuardBytes, kGuard);
  std::fill(r.exchange.begin(), r.exchange.end(), kPoison);
  int i = 0;
  for (unsigned z = 0; z < r.block.z; ++z) {
    for (unsigned y = 0; y < r.block.y; ++y) {
      for (unsigned x = 0; x < r.block.x; ++x, ++i) {
        Fiber& f = r.fibers[i];
        f.index = dim3(x, y, z);
        f.state = State::Runnable;
        f.shuffles = 0;
        make_context(f.context, r.stacks[i].get(), kStackBytes, fiber_main);
      }
    }
  }
}

std::string describe_states(const BlockRun& r) {
  std::ostringstream s;
  for (std::size_t i = 0; i < r.fibers.size(); ++i) {
    const Fiber& f = r.fibers[i];
    if (f.state == State::Done) continue;
    s << " thread (" << f.index.x << ", " << f.index.y << ", " << f.index.z << ") "
      << (f.state == State::AtBlockBarrier ? "at __syncthreads " : "at a warp barrier ") << location(f.where) << ";";
    if (s.tellp() > 600) break;
  }
  return s.str();
}

[[noreturn]] void block_error(const BlockRun& r, const std::string& what) {
  std::ostringstream s;
  s << "cuda_emu: block (" << r.block_index.x << ", " << r.block_index.y << ", " << r.block_index.z << "): " << what;
  throw std::runtime_error(s.str());
}

// Releases the warps whose live lanes all wait at the same warp barrier.
bool release_warps(BlockRun& r) {
  bool released = false;
  const int n = int(r.fibers.size());
  for (int first = 0; first < n; first += kWarpSize) {
    const int last = std::min(first + kWarpSize, n);
    const unsigned warp_mask = last - first == kWarpSize ? 0xffffffffu : (1u << (last - first)) - 1;
    int waiting = 0, live = 0;
    const Fiber* any = nullptr;
    for (int i = first; i < last; ++i) {
      const Fiber& f = r.fibers[i];
      if (f.state == State::Done) continue;
      ++live;
      if (f.state == State::AtWarpBarrier) {
        ++waiting;
        any = &f;
      }
    }
    if (live == 0 || waiting != live) continue;
    for (int i = first; i < last; ++i) {
      const Fiber& f = r.fibers[i];
      if (f.state == State::Done) {
        block_error(r, "a warp shuffle or __syncwarp names lane " + std::to_string(i - first) +
                           ", which has exited, at " + location(any->where));
      }
      if ((f.mask & warp_mask) != warp_mask) {
        block_error(r, "a warp shuffle or __syncwarp mask does not name the whole warp at " + location(f.where));
      }
      if (!same_site(f.where, any->where)) {
        block_error(r, "lanes of a warp wait at different warp barriers: " + location(f.where) + " and " +
                           location(any->where));
      }
    }
    for (int i = first; i < last; ++i) r.fibers[i].state = State::Runnable;
    released = true;
  }
  return released;
}

// Releases the block barrier when every thread waits at the same __syncthreads.
bool release_block(BlockRun& r) {
  const Fiber* any = nullptr;
  for (const Fiber& f : r.fibers) {
    if (f.state != State::AtBlockBarrier) return false;
    if (any != nullptr && !same_site(f.where, any->where)) {
      block_error(r, "threads wait at different __syncthreads: " + location(f.where) + " and " +
                         location(any->where));
    }
    any = &f;
  }
  for (Fiber& f : r.fibers) f.state = State::Runnable;
  return true;
}

void run_block(BlockRun& r) {
  start_block(r);
  const int n = int(r.fibers.size());
  bool reverse = false;
  for (;;) {
    for (int k = 0; k < n; ++k) {
      const int i = reverse ? n - 1 - k : k;
      if (r.fibers[i].state != State::Runnable) continue;
      r.current = i;
      switch_context(r.scheduler, r.fibers[i].context);
      if (!r.error.empty()) block_error(r, r.error);
    }
    const bool all_done =
        std::all_of(r.fibers.begin(), r.fibers.end(), [](const Fiber& f) { return f.state == State::Done; });
    if (all_done) break;
    if (release_warps(r)) continue;
    if (release_block(r)) {
      reverse = !reverse;
      continue;
    }
    const bool some_done =
        std::any_of(r.fibers.begin(), r.fibers.end(), [](const Fiber& f) { return f.state == State::Done; });
    block_error(r, std::string(some_done ? "barrier reached after other threads of the block exited:"
                                         : "deadlock, no thread can proceed:") +
                       describe_states(r));
  }
  const unsigned char* guard = aligned_smem(r) + r.smem_bytes;
  if (std::any_of(guard, guard + kGuardBytes, [](unsigned char b) { return b != kGuard; })) {
    block_error(r, "write past the end of dynamic shared memory");
  }
}

}  // namespace

const dim3& thread_idx() {
  return current_fiber().index;
}
const dim3& block_idx() {
  return run().block_index;
}
const dim3& block_dim() {
  return run().block;
}
const dim3& grid_dim() {
  return run().grid;
}
unsigned char* shared_memory() {
  return aligned_smem(run());
}

int lane_id() {
  return run().current % kWarpSize;
}

unsigned char* next_exchange_slots() {
  BlockRun& r = run();
  Fiber& f = r.fibers[r.current];
  const std::size_t set = f.shuffles++ & 1, warps = (r.fibers.size() + kWarpSize - 1) / kWarpSize;
  return r.exchange.data() + ((set * warps + r.current / kWarpSize) * kWarpSize) * kExchangeBytes;
}

void sync_block(const std::source_location& where) {
  BlockRun& r = run();
  Fiber& f = r.fibers[r.current];
  f.state = State::AtBlockBarrier;
  f.where = where;
  yield(r);
}

void sync_warp(unsigned mask, const std::source_location& where) {
  BlockRun& r = run();
  Fiber& f = r.fibers[r.current];
  f.state = State::AtWarpBarrier;
  f.where = where;
  f.mask = mask;
  yield(r);
}

void launch_grid(dim3 grid, dim3 block, std::size_t smem_bytes, const std::function<void()>& body) {
  validate_launch(grid, block, smem_bytes);
  if (active != nullptr) throw std::runtime_error("cuda_emu: kernel launch from inside a kernel");
  static thread_local std::vector<std::unique_ptr<char[]>> stack_pool;
  const int threads = int(block.x * block.y * block.z);
  while (int(stack_pool.size()) < threads) stack_pool.emplace_back(new char[kStackBytes]);
  BlockRun r;
  r.grid = grid;
  r.block = block;
  r.smem_bytes = smem_bytes;
  r.smem.resize(smem_bytes + kGuardBytes + 16);
  r.exchange.resize(2 * std::size_t(threads + kWarpSize) * kExchangeBytes);
  r.fibers.resize(threads);
  r.stacks.swap(stack_pool);
  r.body = &body;
  active = &r;
  try {
    for (unsigned z = 0; z < grid.z; ++z) {
      for (unsigned y = 0; y < grid.y; ++y) {
        for (unsigned x = 0; x < grid.x; ++x) {
          r.block_index = dim3(x, y, z);
          run_block(r);
        }
      }
    }
  } catch (...) {
    active = nullptr;
    r.stacks.swap(stack_pool);
    throw;
  }
  active = nullptr;
  r.stacks.swap(stack_pool);
}

}  // namespace cuda_emu::detail
