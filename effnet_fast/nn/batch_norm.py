"""The nn.BatchNorm2d side of the fused BatchNorm ops: one adapter from a BatchNorm module
to the ops' arguments and back to its running statistics, the BN + SiLU of the 1x1
convs, the projection BatchNorm, synchronised BatchNorm (`SyncBatchNorm2d`), and the
recomputation of running statistics.

Every fused layer reads a BatchNorm through `bn_op_args` and writes its running
statistics through `update_running_stats`, so nn.BatchNorm2d's semantics (batch
statistics in training or without running statistics, momentum, momentum=None as a
cumulative average, affine=False) are written once.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.batch_norm import local_count, sync_batch_norm_op
from ..ops.bn_silu import LAYER as BN_SILU_LAYER
from ..ops.bn_silu import bn_silu_op, check_inputs as check_bn_silu_inputs
from ..ops.common import acc_dtype, as_supported_layout, check_batch_stats, refuse_unsupported_transforms
from ..ops.backends import resolve_backend


def affine_or_identity(bn, x):
    """BatchNorm's weight and bias, each (C,); ones and zeros in x's accumulation dtype
    for BatchNorm2d(affine=False)."""
    if bn.weight is not None:
        return bn.weight, bn.bias
    acc = acc_dtype(x.dtype)
    return x.new_ones(bn.num_features, dtype=acc), x.new_zeros(bn.num_features, dtype=acc)


class BNOpArgs(NamedTuple):
    """What a fused BN op needs from an nn.BatchNorm2d (see `bn_op_args`)."""
    weight: torch.Tensor
    bias: torch.Tensor
    running_mean: torch.Tensor  # empty (0,) without running statistics
    running_var: torch.Tensor
    use_batch_stats: bool
    group: str  # process group merging the batch statistics, "" for none


def bn_op_args(bn, x):
    """The arguments of a fused BN op for BatchNorm `bn` on input x (N, C, H, W): affine
    parameters (ones and zeros when affine=False), running statistics (empty tensors
    when not tracked), whether the batch statistics are used (training, or no running
    statistics, as nn.BatchNorm2d) and the synchronisation group."""
    weight, bias = affine_or_identity(bn, x)
    none = weight.new_zeros(0)
    return BNOpArgs(weight, bias,
                    bn.running_mean if bn.running_mean is not None else none,
                    bn.running_var if bn.running_var is not None else none,
                    bn.training or bn.running_mean is None, sync_group(bn))


@torch.no_grad()
def update_running_stats(bn, mean, var, count):
    """The running-statistics update of nn.BatchNorm2d in training mode, given the
    batch mean and biased variance over `count` values per channel (an int, or a
    scalar tensor: the count over every rank of a synchronised BatchNorm)."""
    bn.num_batches_tracked.add_(1)
    momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    if isinstance(count, torch.Tensor):
        unbiased = var * (count / (count - 1).clamp(min=1)).to(var.dtype)
    else:
        unbiased = var * (count / max(count - 1, 1))
    bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), momentum)
    bn.running_var.lerp_(unbiased.to(bn.running_var.dtype), momentum)


def record_batch_stats(bn, args, mean, var, count, local):
    """After a fused op in training mode: update `bn`'s running statistics from the op's
    batch statistics (over every rank's `count` when synchronised, else `local` values)."""
    if bn.training and bn.track_running_stats:
        update_running_stats(bn, mean, var, count if args.group else local)


def bn_silu(y, bn, backend=True):
    """silu(bn(y)) for y (N, C, H, W) and an nn.BatchNorm2d `bn`, by the fused op
    effnet_fast::bn_silu, with nn.BatchNorm2d's semantics (see the module docstring).
    `backend`: True/'auto' or a backend name. Returns a tensor of y's shape, dtype and
    memory format (NCHW or channels_last)."""
    if y.numel() == 0:
        return F.silu(bn(y))  # an empty batch (or plane): exactly as the reference
    refuse_unsupported_transforms(BN_SILU_LAYER, y)
    backend = resolve_backend(backend, y.device)
    args = bn_op_args(bn, y)
    check_bn_silu_inputs(y, args.weight, args.bias)
    if args.use_batch_stats and not args.group:  # synchronised: one value per rank suffices, as nn.SyncBatchNorm
        check_batch_stats(BN_SILU_LAYER, y.shape, bn.eps)
    out, mean, var, count = bn_silu_op(as_supported_layout(y), args.weight, args.bias, args.running_mean,
                                       args.running_var, args.use_batch_stats, bn.eps, backend, args.group)
    record_batch_stats(bn, args, mean, var, count, local_count(y))
    return out


def batch_norm(bn, y):
    """bn(y) for a BatchNorm without activation in a fused layer (the projection): one
    that synchronises runs the op effnet_fast::sync_batch_norm, on any device;
    otherwise nn.BatchNorm2d's computation."""
    if not is_synchronised(bn):
        return bn(y)
    group = sync_group(bn)
    if not group or y.numel() == 0:
        return nn.modules.batchnorm._BatchNorm.forward(bn, y)  # nothing to merge (an empty batch: see README)
    out, mean, var, count = sync_batch_norm_op(y, *affine_or_identity(bn, y), bn.eps, group)
    if bn.track_running_stats:
        update_running_stats(bn, mean, var, count)
    return out


class SyncBatchNorm2d(nn.BatchNorm2d):
    """An nn.BatchNorm2d whose batch statistics the fused layers merge over the ranks of
    `process_group` (None: the world) in training mode, as nn.SyncBatchNorm does, on
    any device; installed by effnet_fast.distributed.convert_sync_batchnorm. Not an
    nn.SyncBatchNorm, which DistributedDataParallel refuses in CPU modules. Same
    parameters, buffers and state_dict keys as nn.BatchNorm2d.

    Called as a module (a reference layer), it synchronises CUDA tensors and refuses
    CPU ones (synchronised BatchNorm on the CPU is a feature of the fused layers);
    with nothing to synchronise (eval mode, no process group, a group of one rank) it
    is nn.BatchNorm2d."""

    def __init__(self, *args, process_group=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    def forward(self, input):
        if sync_group(self):
            if input.numel() == 0:
                raise RuntimeError("synchronised BatchNorm: an empty batch cannot take part (the other ranks "
                                   "would wait for its statistics); give every rank at least one sample")
            if input.device.type == "cpu":
                raise RuntimeError(CPU_SYNC_BN_ERROR)
        return batch_norm(self, input)


CPU_SYNC_BN_ERROR = ("synchronised BatchNorm on the CPU needs the fused layers (the reference layers' "
                     "nn.SyncBatchNorm runs on GPU tensors only): build the model with fused=True (or a backend "
                     "name, e.g. fused='cpu') or call model.set_fused(True)")


def is_synchronised(bn):
    return isinstance(bn, (SyncBatchNorm2d, nn.SyncBatchNorm))


def sync_group(bn):
    """Name of the process group over which `bn` merges its batch statistics, "" for none:
    a SyncBatchNorm2d or nn.SyncBatchNorm in training mode with torch.distributed
    initialised and at least two ranks in its group (its `process_group`, default the
    world). The fused ops take the name: custom ops cannot take a ProcessGroup."""
    if not (is_synchronised(bn) and bn.training):
        return ""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return ""
    group = bn.process_group or dist.group.WORLD
    return group.group_name if dist.get_world_size(group) > 1 else ""


@torch.no_grad()
def recompute_bn_statistics(model, inputs):
    """Set every BatchNorm's running statistics to the plain average (momentum None) over
    train-mode forwards of the tensors `inputs` yields, then restore the momenta and the
    model's mode. Used after training epochs too short for the exponential averages to
    catch up with the weights, and to give a fresh model realistic statistics."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    was_training = model.training
    model.train()
    try:
        for x in inputs:
            model(x)
    finally:
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
        model.train(was_training)
    return model
