"""`freeze(model)`: an explicit inference model, with every BatchNorm folded into its conv
once (as torch.jit.freeze, inductor's freezing or an export to ONNX Runtime do).

Works on an effnet_fast.EfficientNet (fused or not) and on torchvision's and timm's
EfficientNets, patched by effnet_fast.patch or not. The frozen model owns copies of the
folded weights: later changes of `model` do not reach it, and `model` keeps training.
Convs with TF 'same' padding (ours and timm's Conv2dSame) are folded too, their zeros
added per input size as the conv did. A block that the frozen layers cannot compute
exactly (another activation, a dilated conv, a BatchNorm without running statistics, an
unknown module) is kept as a copy of the original in eval mode, and the repr names it.
"""
import copy

import torch
from torch import nn

from .efficientnet import EfficientNet
from .nn.layers import ConvBNAct, DWConvBNSiLU, FusedMBConv, MBConv, SqueezeExcitation, is_same_padded
from .nn.frozen import FrozenClassifier, FrozenConv, FrozenFusedMBConv, FrozenMBConv, FrozenSequential
from .ops.backends import check_fused_setting
from .patch import (ORIGINAL, Patched, block_parts, conv_bn_problem, fused_mbconv_parts, kind_of,
                    se_project_problem)


def freeze(model, backend=True, dtype=None):
    """A new eval-only module computing `model`'s eval forward (N, C, H, W) -> (N, classes)
    with every BatchNorm folded into the conv before it.

    model: an effnet_fast.EfficientNet, or a torchvision / timm EfficientNet (patched or
        not); its weights are copied as they are now, on their device and in their dtype.
    backend: the fused backend of the squeeze-excitation kernels (True: the fastest built
        one for the input's device; see effnet_fast.BACKENDS).
    dtype: the dtype the frozen model computes in (default: the model's). BatchNorm is
        folded in float32 (float64 for a float64 model), then the folded weights are cast
        once. A bfloat16 / float16 frozen model takes inputs in its dtype (answering in
        it) or in float32 (answering in float32); on a CPU with bfloat16 instructions a
        bfloat16 model runs oneDNN's bfloat16 convolutions. Under torch.autocast any
        frozen model runs in autocast's dtype.

    The frozen model refuses train() and inputs that require grad; `.to(device)` and
    `load_state_dict` of its own state_dict work (its keys are not the model's: save
    `frozen.state_dict()` and load it into `freeze(<same architecture>)`).
    Raises TypeError for a model of another kind."""
    check_fused_setting(backend)
    if dtype is not None and dtype not in FROZEN_DTYPES:
        raise TypeError(f"freeze: dtype={dtype}; a frozen model computes in one of "
                        f"{', '.join(map(str, FROZEN_DTYPES))}")
    frozen = _freeze_model(model, backend or True)
    return frozen if dtype is None else frozen.to(dtype)


FROZEN_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _freeze_model(model, backend):
    kept = []
    if isinstance(model, EfficientNet):
        stages = [_freeze(model.stem, "stem", backend, kept),
                  *(_freeze(stage, f"blocks.{i}", backend, kept) for i, stage in enumerate(model.blocks)),
                  _freeze(model.head, "head", backend, kept)]
        return _classifier(stages, model.classifier, model.in_channels, f"EfficientNet {model.version}", kept)
    kind = kind_of(_original(model))
    if kind == "torchvision_efficientnet":
        stages = [_freeze(m, f"features.{i}", backend, kept) for i, m in enumerate(model.features)]
        return _classifier(stages, _linear(model.classifier), model.features[0][0].in_channels,
                           "torchvision EfficientNet", kept)
    if kind == "timm_efficientnet":
        return _freeze_timm(model, backend, kept)
    raise TypeError(f"freeze: expected an effnet_fast.EfficientNet or a torchvision / timm EfficientNet, got "
                    f"{type(model).__name__}")


def _classifier(stages, linear, in_channels, source, kept):
    classifier = copy.deepcopy(linear).eval().requires_grad_(False)
    return FrozenClassifier(stages, classifier, in_channels, source, kept)


def _linear(head):
    """The nn.Linear of a classifier head (nn.Linear, or a Sequential of dropout + Linear)."""
    layers = [m for m in head.modules() if not isinstance(m, (nn.Sequential, nn.Dropout, nn.Identity))]
    if len(layers) != 1 or type(layers[0]) is not nn.Linear:
        raise TypeError(f"freeze: the classifier {head} is not a Linear layer (after dropout)")
    return layers[0]


def _freeze_timm(model, backend, kept):
    pool = model.global_pool
    if getattr(pool, "pool_type", "avg") != "avg":
        raise TypeError(f"freeze: timm model with global pool {pool.pool_type!r}; only 'avg' is frozen")
    stem = _conv_bn_act(model.conv_stem, _original(model.bn1), "conv_stem + bn1", kept)
    blocks = [_freeze(stage, f"blocks.{i}", backend, kept) for i, stage in enumerate(model.blocks)]
    head = _conv_bn_act(model.conv_head, _original(model.bn2), "conv_head + bn2", kept)
    return _classifier([stem, *blocks, head], _linear(model.classifier), model.conv_stem.in_channels,
                       "timm EfficientNet", kept)


def _original(module):
    """The module `patch` replaced (sharing the adapter's children), or `module`."""
    return module.__dict__[ORIGINAL] if isinstance(module, Patched) else module


def _freeze(module, path, backend, kept):
    """The frozen form of `module`, or an eval copy of it (recorded in `kept`)."""
    module = _original(module)
    if type(module) is nn.Sequential:
        return FrozenSequential([_freeze(m, f"{path}.{name}", backend, kept) for name, m in module.named_children()])
    try:
        frozen = _ours(module, backend) if isinstance(module, (ConvBNAct, DWConvBNSiLU, MBConv, FusedMBConv)) \
            else None
        if frozen is None:
            frozen = _peers(module, backend)
    except ValueError:  # a BatchNorm without running statistics: it cannot be folded
        frozen = None
    if frozen is None:
        return _keep(module, path, kept)
    return frozen


def _keep(module, path, kept):
    kept.append(f"{path} ({type(module).__name__})")
    return copy.deepcopy(module).eval().requires_grad_(False)


def _act_of(module):
    """The activation a ConvBNAct applies: 'silu', None, or another module (not frozen)."""
    act = getattr(module, "act", None)
    if act is None:
        return None
    return "silu" if type(act) is nn.SiLU else act


def _ours(module, backend):
    if isinstance(module, (ConvBNAct, DWConvBNSiLU)):
        act = "silu" if isinstance(module, DWConvBNSiLU) else _act_of(module)
        if act not in ("silu", None) or not (type(module.conv) is nn.Conv2d or is_same_padded(module.conv)):
            return None
        return FrozenConv(module.conv, module.bn, act == "silu")
    if isinstance(module, FusedMBConv):
        conv = _ours(module.conv, backend)
        project = None if module.project is None else _ours(module.project, backend)
        if conv is None or not conv.act or (module.project is not None and (project is None or project.act)):
            return None
        return FrozenFusedMBConv(conv, project, module.use_residual)
    # MBConv
    expand = None if module.expand is None else _ours(module.expand, backend)
    if (module.expand is not None and expand is None) or not isinstance(module.se, SqueezeExcitation):
        return None
    dw, project = _ours(module.dw, backend), _ours(module.project, backend)
    if dw is None or project is None or project.act:
        return None
    return FrozenMBConv(expand, dw, module.se.fc1, module.se.fc2, project, module.use_residual, backend)


def _conv_bn_act(conv, bn, path, kept):
    """FrozenConv of a timm conv + BatchNormAct2d (SiLU or none), or an eval copy of both."""
    act = getattr(bn, "act", None)
    silu = isinstance(act, nn.SiLU)
    if _conv_bn_problem(conv, bn, None if silu or isinstance(act, nn.Identity) else act) or bn.running_mean is None:
        return _keep(nn.Sequential(conv, bn), path, kept)
    return FrozenConv(conv, bn, silu)


def _conv_bn_problem(conv, bn, act):
    """Why conv + BN (+ act) cannot be a FrozenConv (None: it can; FrozenConv pads TF
    'same' convs as they do)."""
    return conv_bn_problem(conv, bn, act, same_padding_ok=True)


def _peers(module, backend):
    """Frozen forms of torchvision's and timm's blocks, from the parts `patch` reads."""
    kind = kind_of(module)
    if kind == "torchvision_conv_norm_act":
        conv, bn = module[0], module[1]
        act = module[2] if len(module) > 2 else None
        if _conv_bn_problem(conv, bn, act):
            return None
        return FrozenConv(conv, bn, act is not None)
    if kind in ("torchvision_fused_mbconv", "timm_edge_residual", "timm_conv_bn_act"):
        return _peer_fused_mbconv(module, kind)
    if kind not in ("torchvision_mbconv", "timm_inverted_residual", "timm_depthwise_separable"):
        return None
    parts = block_parts(module, kind)
    if parts is None or se_project_problem(parts):
        return None
    expand = None
    if parts.expand is not None:
        if _conv_bn_problem(*parts.expand):
            return None
        expand = FrozenConv(parts.expand[0], parts.expand[1], parts.expand[2] is not None)
    conv, bn, act = parts.dw
    if _conv_bn_problem(conv, bn, act) or not isinstance(act, nn.SiLU):
        return None
    fc1, _, fc2, _ = parts.se
    return FrozenMBConv(expand, FrozenConv(conv, bn, True), fc1, fc2, FrozenConv(*parts.project[:2]),
                        parts.has_skip, backend)


def _peer_fused_mbconv(module, kind):
    """FrozenFusedMBConv of a torchvision / timm Fused-MBConv block, or None."""
    parts = fused_mbconv_parts(module, kind)
    if parts is None:
        return None
    (conv, bn, act), project, has_skip = parts
    if _conv_bn_problem(conv, bn, act) or not isinstance(act, nn.SiLU):
        return None
    if project is not None:
        if _conv_bn_problem(*project) or project[2] is not None:
            return None
        project = FrozenConv(*project[:2])
    return FrozenFusedMBConv(FrozenConv(conv, bn, True), project, has_skip)
