// Outputs of the CPU kernels that are activations (megabytes each).
//
// A fresh allocation of that size is a new mmap from the C allocator, and every
// 4 KiB page of it faults and is zeroed by the kernel on first touch: in a B0
// training step at batch 16 some 140,000 faults, a third of the step on a 2-core
// machine. Freed activation blocks are kept here instead (by size, up to a bound),
// backed by transparent huge pages where the system allows, and handed out again
// to the next output of the same size, which every training step asks for.
#pragma once

#include <ATen/ATen.h>

namespace effnet_fast::cpu {

// Like at::empty(sizes, options.memory_format(format)) for a CPU tensor; large
// tensors take their memory from the activation cache.
at::Tensor empty_activation(at::IntArrayRef sizes, const at::TensorOptions& options, at::MemoryFormat format);

}  // namespace effnet_fast::cpu
