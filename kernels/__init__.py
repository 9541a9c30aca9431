"""Triton kernels for effnet_fast, shipped as effnet_fast.kernels.

Exports the kernel-level ops of csrc/ops.cpp with the same signatures."""
