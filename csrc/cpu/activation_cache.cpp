#include "activation_cache.h"

#include <sys/mman.h>

#include <cstdlib>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace effnet_fast::cpu {
namespace {

constexpr size_t kMinBytes = size_t(1) << 20;   // smaller tensors: the C allocator reuses them well
constexpr size_t kBlock = size_t(2) << 20;      // a huge page
constexpr size_t kMaxCached = size_t(1) << 30;  // freed bytes kept at most

class ActivationCache {
 public:
  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.find(bytes);
      if (it != free_.end() && !it->second.empty()) {
        void* p = it->second.back();
        it->second.pop_back();
        cached_ -= bytes;
        return p;
      }
    }
    void* p = nullptr;
    if (posix_memalign(&p, kBlock, bytes) != 0) return nullptr;
#ifdef MADV_HUGEPAGE
    madvise(p, bytes, MADV_HUGEPAGE);  // a hint: fewer faults where THP is enabled
#endif
    return p;
  }

  void give_back(void* p, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (cached_ + bytes <= kMaxCached) {
        free_[bytes].push_back(p);
        cached_ += bytes;
        return;
      }
    }
    std::free(p);
  }

 private:
  std::mutex mutex_;
  std::unordered_map<size_t, std::vector<void*>> free_;
  size_t cached_ = 0;
};

// Never destroyed: tensors freed during interpreter shutdown still give their blocks back.
ActivationCache& cache() {
  static auto* instance = new ActivationCache();
  return *instance;
}

}  // namespace

at::Tensor empty_activation(at::IntArrayRef sizes, const at::TensorOptions& options, at::MemoryFormat format) {
  const at::TensorOptions opts = options.memory_format(format);
  const size_t bytes = size_t(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (bytes < kMinBytes) return at::empty(sizes, opts);
  const size_t rounded = (bytes + kBlock - 1) / kBlock * kBlock;
  void* p = cache().take(rounded);
  if (p == nullptr) return at::empty(sizes, opts);
  const at::Tensor layout = at::empty(sizes, at::TensorOptions(options.dtype()).device(at::kMeta).memory_format(format));
  return at::from_blob(p, sizes, layout.strides(), [rounded](void* q) { cache().give_back(q, rounded); },
                       options.memory_format(std::nullopt));
}

}  // namespace effnet_fast::cpu
