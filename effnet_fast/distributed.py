"""Multi-process training: synchronised BatchNorm for the fused layers.

`convert_sync_batchnorm(model)` makes every BatchNorm of a model merge its batch
statistics over the processes of a group in training mode, as nn.SyncBatchNorm does:
forward normalises with the mean and variance of the union of every rank's batch and
updates the running statistics with them (unbiased variance over the combined count);
backward uses the per-channel sums of the gradient over every rank for the input
gradient, and keeps the BatchNorm weight and bias gradients local (DDP averages them).

The fused layers do this inside their ops, on every backend and device (gloo on the
CPU, NCCL on the GPU): the depthwise conv + BN + SiLU (effnet_fast::dwconv_bn_silu),
the BN + SiLU of the stem, expand and head convs (effnet_fast::bn_silu) and the
projection BN (effnet_fast::sync_batch_norm) all-gather (count, mean, var) between
their statistics and apply kernels and all-reduce two per-channel sums in backward
(effnet_fast/ops/batch_norm.py, effnet_fast/nn/batch_norm.py). The reference layers use nn.SyncBatchNorm, which
runs on CUDA tensors only.
"""
import torch
from torch import nn

from .nn.batch_norm import CPU_SYNC_BN_ERROR, SyncBatchNorm2d
from .nn.layers import FusedConvBNAct, FusedDWConvBNSiLU

__all__ = ["convert_sync_batchnorm", "SyncBatchNorm2d"]


def convert_sync_batchnorm(model, process_group=None):
    """Make every BatchNorm of `model` synchronise its batch statistics over the ranks of
    `process_group` (default: the whole world, resolved at each forward) in training
    mode, in place; returns the model (a new module if `model` is itself a BatchNorm).

    The BatchNorms of the fused layers become `SyncBatchNorm2d`s, which the fused ops
    synchronise on every backend and device: the CPU (gloo) and the GPU (NCCL). Those of
    reference layers (fused=False) and any other BatchNorm become nn.SyncBatchNorm,
    which runs on CUDA tensors only: convert after moving the model to its device.
    Parameters and buffers are shared, so state_dict keys do not change and an
    optimizer built before the conversion keeps working.

    As with nn.SyncBatchNorm, converting needs no initialised process group: without
    one, with a group of one rank, or in eval mode the BatchNorms compute exactly what
    they computed before (no communication).

    Raises RuntimeError when a BatchNorm outside the fused layers is on the CPU:
    synchronised BatchNorm on the CPU needs the fused layers. Models adapted by
    `effnet_fast.patch` are refused (TypeError): `unpatch` them first."""
    from .patch import Patched

    if any(isinstance(m, Patched) for m in model.modules()):
        raise TypeError("convert_sync_batchnorm: the model holds layers adapted by effnet_fast.patch, whose fused "
                        "views would keep unsynchronised BatchNorms; call effnet_fast.unpatch(model) first (and "
                        "use nn.SyncBatchNorm.convert_sync_batchnorm on CUDA, or build an effnet_fast.EfficientNet "
                        "with fused=True)")
    fused = {id(m.bn) for m in model.modules() if isinstance(m, (FusedConvBNAct, FusedDWConvBNSiLU))}
    on_cpu = sorted(name or "(the model itself)" for name, m in model.named_modules()
                    if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in fused and _on_cpu(m))
    if on_cpu:
        raise RuntimeError(f"convert_sync_batchnorm: {CPU_SYNC_BN_ERROR} (BatchNorms of reference layers on the "
                           f"CPU: {', '.join(on_cpu[:3])}{', ...' if len(on_cpu) > 3 else ''})")
    return _convert(model, process_group, fused)


def _on_cpu(bn):
    t = bn.weight if bn.weight is not None else bn.running_mean
    return t is None or t.device.type == "cpu"


def _convert(module, process_group, fused):
    """nn.SyncBatchNorm.convert_sync_batchnorm, installing a SyncBatchNorm2d in the fused layers."""
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        kwargs = dict(bias=module.bias is not None)
        if id(module) in fused:
            out = SyncBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                  module.track_running_stats, process_group=process_group, **kwargs)
        else:
            out = nn.SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                   module.track_running_stats, process_group, **kwargs)
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
        if hasattr(module, "qconfig"):
            out.qconfig = module.qconfig
    for name, child in module.named_children():
        out.add_module(name, _convert(child, process_group, fused))
    return out
