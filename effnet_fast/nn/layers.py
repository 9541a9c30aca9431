"""Building blocks of EfficientNet. The Fused* layers have exactly the parameters,
buffers and state_dict keys of the reference layers they replace, and compute from the
current parameters and statistics on every call (in eval mode too: folding BatchNorm
into the convs is an explicit step, effnet_fast.freeze). A fused layer whose inner
modules carry hooks (or while global module hooks are registered) runs those modules
instead, so that the hooks fire and see what they see in the reference layers.

Padding: "symmetric" pads k // 2 on every side (torchvision, timm's efficientnet_b*);
"same" is TensorFlow's 'same' padding (timm's tf_efficientnet_b*), which depends on the
input size and is asymmetric for stride 2 and even sizes. A "same" conv with stride 1
pads k // 2 on every side too, so only strided convs need Conv2dSame."""
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ..ops import dwconv_bn_silu_fn, resolve_backend, squeeze_excite_fn, squeeze_excite_project_fn
from ..ops.common import REFERENCE_HINT, tf_same_padding
from .batch_norm import batch_norm, bn_op_args, bn_silu, record_batch_stats


def has_hooks(modules):
    """True when calling one of `modules` would run a hook: its own forward or backward
    (pre-)hooks (torch.nn.utils.prune and spectral_norm are forward pre-hooks), a
    parametrization (weight_norm, orthogonal, ...), or a global module hook."""
    g = nn.modules.module
    if (g._global_forward_hooks or g._global_forward_pre_hooks or g._global_backward_hooks
            or g._global_backward_pre_hooks):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
               or parametrize.is_parametrized(m) for m in modules)


def inner_modules(module):
    """The modules below `module` (not itself): the ones a fused layer would not call."""
    return [m for m in module.modules() if m is not module]


PADDINGS = ("symmetric", "same")


SAME_PADDING_MARKER = "tf_same_padding"


class Conv2dSame(nn.Conv2d):
    """nn.Conv2d with TensorFlow's 'same' padding, computed from each input's size as
    timm's Conv2dSame does (its `padding` attribute is 0; the zeros are added in forward)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, dilation=1, groups=1, bias=True):
        super().__init__(in_channels, out_channels, kernel_size, stride, 0, dilation, groups, bias)
        # A state dict entry that marks TF weights: a symmetric model refuses them by name
        # (unexpected key) instead of loading weights its padding would compute wrongly.
        self.register_buffer(SAME_PADDING_MARKER, torch.ones((), dtype=torch.bool))

    def forward(self, x):
        top, bottom, left, right = same_padding(self, x)
        return super().forward(F.pad(x, (left, right, top, bottom)))


# A state dict entry (a float64 scalar) of a model built with another BatchNorm eps than its
# variant's default: eps is not a tensor, so without it the weights would load into a model
# with the default eps and answer differently.
BN_EPS_MARKER = "bn_eps"


def bn_eps_marker(state_dict):
    """The BatchNorm eps a state dict of ours records (BN_EPS_MARKER), or None for the default."""
    value = state_dict.get(BN_EPS_MARKER)
    return None if value is None else float(value)


def has_same_padding_marker(state_dict):
    """True when a state dict of ours comes from a model with TF 'same' padding."""
    return any(key.rsplit(".", 1)[-1] == SAME_PADDING_MARKER for key in state_dict)


def is_same_padded(conv):
    """True for a conv with TF 'same' padding computed at run time: ours (Conv2dSame) or
    timm's (timm.layers.Conv2dSame), by exact class."""
    cls = type(conv)
    return cls is Conv2dSame or (cls.__module__, cls.__name__) == ("timm.layers.conv2d_same", "Conv2dSame")


def same_padding(conv, x):
    """(top, bottom, left, right) zeros of TF 'same' padding for `conv` on input x."""
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    return (*tf_same_padding(x.shape[-2], kh, sh, dh), *tf_same_padding(x.shape[-1], kw, sw, dw))


def make_conv(in_channels, out_channels, kernel_size, stride=1, groups=1, padding="symmetric"):
    """A conv without bias padded "symmetric" (k // 2) or "same" (TF): an nn.Conv2d where
    the padding is static (always for stride 1), else a Conv2dSame."""
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    if padding == "same" and stride != 1:
        return Conv2dSame(in_channels, out_channels, kernel_size, stride, groups=groups, bias=False)
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False)


class ConvBNAct(nn.Sequential):
    """Conv (no bias) + BatchNorm (+ SiLU), padding "symmetric" (k // 2) or "same" (TF)."""

    def __init__(self, in_channels, out_channels, kernel_size=1, stride=1, groups=1, act=True,
                 bn_eps=1e-5, bn_momentum=0.1, padding="symmetric"):
        super().__init__()
        self.conv = make_conv(in_channels, out_channels, kernel_size, stride, groups, padding)
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
        if has_hooks(inner_modules(self)):
            return super().forward(x)
        y = self.conv(x)
        return bn_silu(y, self.bn, self.backend) if hasattr(self, "act") else batch_norm(self.bn, y)

    def extra_repr(self):
        return f"backend={self.backend!r}"


class DWConvBNSiLU(nn.Module):
    """Depthwise k x k conv + BatchNorm + SiLU (reference path); padding "symmetric"
    (k // 2) or "same" (TF, computed from the input size by a Conv2dSame)."""

    def __init__(self, channels, kernel_size, stride, bn_eps=1e-5, bn_momentum=0.1, padding="symmetric"):
        super().__init__()
        self.conv = make_conv(channels, channels, kernel_size, stride, channels, padding)
        self.bn = nn.BatchNorm2d(channels, eps=bn_eps, momentum=bn_momentum)

    def forward(self, x):
        return F.silu(self.bn(self.conv(x)))


class FusedDWConvBNSiLU(DWConvBNSiLU):
    """DWConvBNSiLU computed by one fused op; backend True/'auto' or a backend name. A
    conv with TF 'same' padding (Conv2dSame, ours or timm's) passes the op its padding
    for each input's size."""

    def __init__(self, channels, kernel_size, stride, bn_eps=1e-5, bn_momentum=0.1, backend=True,
                 padding="symmetric"):
        super().__init__(channels, kernel_size, stride, bn_eps, bn_momentum, padding)
        self.backend = backend

    def forward(self, x):
        if x.numel() == 0 or has_hooks(inner_modules(self)):
            return super().forward(x)  # an empty batch (or plane): exactly as the reference
        same = is_same_padded(self.conv)
        check_conv_settings(self, self.conv, stride=self.conv.stride[0],
                            padding=0 if same else self.conv.kernel_size[0] // 2,
                            groups=self.conv.in_channels, bias=False)
        args = bn_op_args(self.bn, x)
        out, mean, var, count = dwconv_bn_silu_fn(
            x, self.conv.weight, args.weight, args.bias, args.running_mean, args.running_var, args.use_batch_stats,
            self.bn.eps, self.conv.stride[0], resolve_backend(self.backend, x.device), args.group,
            same_padding(self.conv, x) if same else None)
        record_batch_stats(self.bn, args, mean, var, count, out.numel() // out.shape[1])
        return out

    def extra_repr(self):
        return f"backend={self.backend!r}"


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


class SqueezeExcitation(nn.Module):
    """x * sigmoid(fc2(silu(fc1(avgpool(x))))), fc1/fc2 1x1 convs with bias: (N, C, H, W)
    -> (N, C, H, W) through a (N, reduced_channels) bottleneck."""

    def __init__(self, channels, reduced_channels):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, reduced_channels, 1)
        self.fc2 = nn.Conv2d(reduced_channels, channels, 1)

    def forward(self, x):
        gate = torch.sigmoid(self.fc2(F.silu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return x * gate


class FusedSqueezeExcitation(SqueezeExcitation):
    """SqueezeExcitation computed by the fused op effnet_fast::squeeze_excite (pool and
    channel scale as kernels, the two small fully connected layers in torch) on backend
    True/'auto' or a backend name. Input and output (N, C, H, W), NCHW or channels_last.
    `forward_project` adds the block's 1x1 projection conv without storing the gated
    tensor."""

    def __init__(self, channels, reduced_channels, backend=True):
        super().__init__(channels, reduced_channels)
        self.backend = backend

    def forward(self, x):
        if x.numel() == 0 or has_hooks(inner_modules(self)):
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


class FusedMBConv(nn.Module):
    """EfficientNetV2's Fused-MBConv ("fused" is the paper's word: the 1x1 expand and the
    depthwise conv merged into one regular k x k conv; timm calls it EdgeResidual): k x k
    conv (+ BN + SiLU), then a 1x1 projection (+ BN), and stochastic depth + the identity
    when the shape is kept. project=False drops the projection, the k x k conv mapping
    straight to out_channels (torchvision's Fused-MBConv with expand ratio 1, timm's
    ConvBnAct). (N, C_in, H, W) -> (N, C_out, H / stride, W / stride). set_fused swaps its
    ConvBNActs for FusedConvBNAct (BN + SiLU as one op)."""

    def __init__(self, in_channels, out_channels, expand_ratio, kernel_size, stride, drop_prob,
                 project=True, bn_eps=1e-5, bn_momentum=0.1, padding="symmetric"):
        super().__init__()
        bn = dict(bn_eps=bn_eps, bn_momentum=bn_momentum)
        if not project and expand_ratio != 1:
            raise ValueError(f"a Fused-MBConv without projection maps {in_channels} to {out_channels} channels "
                             f"directly; it has no expand ratio ({expand_ratio})")
        mid = in_channels * expand_ratio if project else out_channels
        self.conv = ConvBNAct(in_channels, mid, kernel_size, stride, padding=padding, **bn)
        self.project = ConvBNAct(mid, out_channels, 1, act=False, **bn) if project else None
        self.use_residual = stride == 1 and in_channels == out_channels
        self.drop_path = StochasticDepth(drop_prob) if self.use_residual else nn.Identity()

    def forward(self, x):
        out = self.conv(x)
        if self.project is not None:
            out = self.project(out)
        if self.use_residual:
            out = self.drop_path(out) + x
        return out


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand (+ BN + SiLU), depthwise k x k (+ BN + SiLU),
    squeeze-excitation, 1x1 project (+ BN), and stochastic depth + the identity when the
    shape is kept. (N, C_in, H, W) -> (N, C_out, H / stride, W / stride). set_fused swaps
    its layers for their Fused* versions; forward then runs SE and the projection as one
    op."""

    def __init__(self, in_channels, out_channels, expand_ratio, kernel_size, stride, drop_prob,
                 se_ratio=0.25, bn_eps=1e-5, bn_momentum=0.1, padding="symmetric"):
        super().__init__()
        bn = dict(bn_eps=bn_eps, bn_momentum=bn_momentum)
        mid = in_channels * expand_ratio
        self.expand = ConvBNAct(in_channels, mid, 1, **bn) if expand_ratio != 1 else None
        self.dw = DWConvBNSiLU(mid, kernel_size, stride, padding=padding, **bn)
        self.se = SqueezeExcitation(mid, max(1, int(in_channels * se_ratio)))
        self.project = ConvBNAct(mid, out_channels, 1, act=False, **bn)
        self.use_residual = stride == 1 and in_channels == out_channels
        self.drop_path = StochasticDepth(drop_prob) if self.use_residual else nn.Identity()

    def forward(self, x):
        out = self.dw(x if self.expand is None else self.expand(x))
        if isinstance(self.se, FusedSqueezeExcitation) and not has_hooks(self.se.modules()) \
                and not has_hooks(self.project.modules()):
            out = batch_norm(self.project.bn, self.se.forward_project(out, self.project.conv))
        else:
            out = self.project(self.se(out))
        if self.use_residual:
            out = self.drop_path(out) + x
        return out
