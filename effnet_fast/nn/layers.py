"""Building blocks of EfficientNet. The Fused* layers have exactly the parameters,
buffers and state_dict keys of the reference layers they replace."""
import torch
from torch import nn
import torch.nn.functional as F

from .ops import dwconv_bn_silu_fn, folded, kernels, resolve_backend, squeeze_excite_fn, squeeze_excite_project_fn
from .ops.batch_norm import sync_batch_norm_op
from .ops.bn_silu import bn_silu
from .ops.common import REFERENCE_HINT, acc_dtype, as_supported_layout
from .ops.dwconv_bn_silu import check_inputs
from .ops.squeeze_excite import check_inputs as check_se_inputs, se_gate


class ConvBNAct(nn.Sequential):
    """Conv (no bias) + BatchNorm (+ SiLU), symmetric padding k // 2."""

    def __init__(self, in_channels, out_channels, kernel_size=1, stride=1, groups=1, act=True,
                 bn_eps=1e-5, bn_momentum=0.1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2,
                              groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=bn_eps, momentum=bn_momentum)
        if act:
            self.act = nn.SiLU(inplace=True)


class FusedConvBNAct(ConvBNAct):
    """ConvBNAct whose BatchNorm + SiLU is one fused op (backend True/'auto' or a backend
    name) that keeps only the conv output for backward."""

    def __init__(self, *args, backend=True, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backend

    def forward(self, x):
        if folded.applies(self, x) and x.numel():
            return folded.conv_bn_act(self, x)
        y = self.conv(x)
        return bn_silu(y, self.bn, self.backend) if hasattr(self, "act") else batch_norm(self.bn, y)

    def extra_repr(self):
        return f"backend={self.backend!r}"


class DWConvBNSiLU(nn.Module):
    """Depthwise k x k conv + BatchNorm + SiLU (reference path)."""

    def __init__(self, channels, kernel_size, stride, bn_eps=1e-5, bn_momentum=0.1):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size, stride, kernel_size // 2,
                              groups=channels, bias=False)
        self.bn = nn.BatchNorm2d(channels, eps=bn_eps, momentum=bn_momentum)

    def forward(self, x):
        return F.silu(self.bn(self.conv(x)))


class FusedDWConvBNSiLU(DWConvBNSiLU):
    """DWConvBNSiLU computed by one fused op; backend True/'auto' or a backend name."""

    def __init__(self, channels, kernel_size, stride, bn_eps=1e-5, bn_momentum=0.1, backend=True):
        super().__init__(channels, kernel_size, stride, bn_eps, bn_momentum)
        self.backend = backend

    def forward(self, x):
        if x.numel() == 0:
            return super().forward(x)  # an empty batch (or plane): exactly as the reference
        check_conv_settings(self, self.conv, stride=self.conv.stride[0], padding=self.conv.kernel_size[0] // 2,
                            groups=self.conv.in_channels, bias=False)
        if folded.applies(self, x) and folded.onednn_ok(x):
            # oneDNN's depthwise conv with the BN folded and SiLU as a post-op runs faster
            # than the fused kernel on this path (docs/PERFORMANCE.md).
            check_inputs(x, self.conv.weight, *affine_or_identity(self.bn, x), self.conv.stride[0])
            return folded.conv_bn_act(self, x, act=True)
        bn = self.bn
        weight, bias = affine_or_identity(bn, x)
        use_batch_stats = bn.training or bn.running_mean is None  # the BatchNorm's mode, as the reference
        running_mean = bn.running_mean if bn.running_mean is not None else weight.new_zeros(0)
        running_var = bn.running_var if bn.running_var is not None else weight.new_zeros(0)
        group = sync_group(bn)  # "" unless a synchronised BatchNorm in training with other ranks
        out, mean, var, count = dwconv_bn_silu_fn(
            x, self.conv.weight, weight, bias, running_mean, running_var, use_batch_stats,
            bn.eps, self.conv.stride[0], resolve_backend(self.backend, x.device), group)
        if bn.training and bn.track_running_stats:
            update_running_stats(bn, mean, var, count if group else out.numel() // out.shape[1])
        return out

    def extra_repr(self):
        return f"backend={self.backend!r}"


def affine_or_identity(bn, x):
    """BatchNorm's weight and bias; ones and zeros for BatchNorm2d(affine=False)."""
    if bn.weight is not None:
        return bn.weight, bn.bias
    acc = acc_dtype(x.dtype)
    return x.new_ones(bn.num_features, dtype=acc), x.new_zeros(bn.num_features, dtype=acc)


def check_conv_settings(layer, conv, stride, padding, groups, bias):
    """The fused kernels compute one conv configuration; refuse a conv whose stride,
    padding, dilation, groups or bias was changed after construction instead of
    computing something else."""
    want = dict(stride=(stride, stride), padding=(padding, padding), dilation=(1, 1), groups=groups,
                padding_mode="zeros", bias=bias)
    got = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
               padding_mode=conv.padding_mode, bias=conv.bias is not None)
    wrong = {name: got[name] for name in want if got[name] != want[name]}
    if wrong:
        expected = {name: want[name] for name in wrong}
        raise ValueError(f"{type(layer).__name__}: the fused kernel computes a conv with {expected}, but this "
                         f"conv has {wrong}; {REFERENCE_HINT}")


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


def sync_group(bn):
    """Name of the process group over which `bn` merges its batch statistics, "" for none:
    a SyncBatchNorm2d or nn.SyncBatchNorm in training mode with torch.distributed
    initialised and at least two ranks in its group (its `process_group`, default the
    world). The fused ops take the name: custom ops cannot take a ProcessGroup."""
    if not (isinstance(bn, (SyncBatchNorm2d, nn.SyncBatchNorm)) and bn.training):
        return ""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return ""
    group = bn.process_group or dist.group.WORLD
    return group.group_name if dist.get_world_size(group) > 1 else ""


def batch_norm(bn, y):
    """bn(y) for a BatchNorm without activation in a fused layer (the projection): one
    that synchronises runs the op effnet_fast::sync_batch_norm, on any device;
    otherwise nn.BatchNorm2d's computation."""
    if not isinstance(bn, (SyncBatchNorm2d, nn.SyncBatchNorm)):
        return bn(y)
    group = sync_group(bn)
    if not group or y.numel() == 0:
        return nn.modules.batchnorm._BatchNorm.forward(bn, y)  # nothing to merge (an empty batch: see README)
    weight, bias = affine_or_identity(bn, y)
    out, mean, var, count = sync_batch_norm_op(y, weight, bias, bn.eps, group)
    if bn.track_running_stats:
        update_running_stats(bn, mean, var, count)
    return out


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


class SqueezeExcitation(nn.Module):
    """x * sigmoid(fc2(silu(fc1(avgpool(x))))), fc1/fc2 1x1 convs with bias."""

    def __init__(self, channels, reduced_channels):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, reduced_channels, 1)
        self.fc2 = nn.Conv2d(reduced_channels, channels, 1)

    def forward(self, x):
        gate = torch.sigmoid(self.fc2(F.silu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return x * gate


class FusedSqueezeExcitation(SqueezeExcitation):
    def __init__(self, channels, reduced_channels, backend=True):
        super().__init__(channels, reduced_channels)
        self.backend = backend

    def forward(self, x):
        if x.numel() == 0:
            return super().forward(x)
        self._check_fc_settings()
        return squeeze_excite_fn(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
                                 resolve_backend(self.backend, x.device))

    def forward_project(self, x, conv):
        """conv(self(x)) for a 1x1 conv without bias, never storing self(x)."""
        if x.numel() == 0:
            return conv(super().forward(x))
        self._check_fc_settings()
        check_conv_settings(self, conv, stride=1, padding=0, groups=1, bias=False)
        return squeeze_excite_project_fn(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
                                         conv.weight, resolve_backend(self.backend, x.device))

    def forward_project_folded(self, x, project, residual):
        """project(self(x)) (+ residual) in eval mode, the projection BN folded and the gate
        folded into the projection weights (effnet_fast.ops.folded.se_project)."""
        self._check_fc_settings()
        check_conv_settings(self, project.conv, stride=1, padding=0, groups=1, bias=False)
        w1, b1, w2, b2 = self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias
        check_se_inputs(x, w1, b1, w2, b2)
        k = kernels(resolve_backend(self.backend, x.device))
        x = as_supported_layout(x)
        return folded.se_project(x, se_gate(k.se_pool(x), w1, b1, w2, b2), project, residual, k.se_scale)

    def _check_fc_settings(self):
        for fc in (self.fc1, self.fc2):
            check_conv_settings(self, fc, stride=1, padding=0, groups=1, bias=True)

    def extra_repr(self):
        return f"backend={self.backend!r}"


class StochasticDepth(nn.Module):
    """Drops the whole residual branch per sample with probability p in training
    (scaling survivors by 1 / (1 - p)), as torchvision's 'row' mode."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0], 1, 1, 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self):
        return f"p={self.p}"


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, depthwise, squeeze-excitation, 1x1 project."""

    def __init__(self, in_channels, out_channels, expand_ratio, kernel_size, stride, drop_prob,
                 se_ratio=0.25, bn_eps=1e-5, bn_momentum=0.1):
        super().__init__()
        bn = dict(bn_eps=bn_eps, bn_momentum=bn_momentum)
        mid = in_channels * expand_ratio
        self.expand = ConvBNAct(in_channels, mid, 1, **bn) if expand_ratio != 1 else None
        self.dw = DWConvBNSiLU(mid, kernel_size, stride, **bn)
        self.se = SqueezeExcitation(mid, max(1, int(in_channels * se_ratio)))
        self.project = ConvBNAct(mid, out_channels, 1, act=False, **bn)
        self.use_residual = stride == 1 and in_channels == out_channels
        self.drop_path = StochasticDepth(drop_prob) if self.use_residual else nn.Identity()

    def forward(self, x):
        out = self.dw(x if self.expand is None else self.expand(x))
        if isinstance(self.se, FusedSqueezeExcitation) and folded.applies(self, x) and out.numel():
            return self.se.forward_project_folded(out, self.project, x if self.use_residual else None)
        if isinstance(self.se, FusedSqueezeExcitation):
            out = batch_norm(self.project.bn, self.se.forward_project(out, self.project.conv))
        else:
            out = self.project(self.se(out))
        if self.use_residual:
            out = self.drop_path(out) + x
        return out
