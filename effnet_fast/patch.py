"""Fused layers for the EfficientNets users already have: torchvision `efficientnet_b0..b7` /
`efficientnet_v2_*` and timm `efficientnet_b*` / `tf_efficientnet_b*` / `efficientnetv2_*` /
`tf_efficientnetv2_*`, swapped in place. In EfficientNetV2's Fused-MBConv blocks (torchvision's
FusedMBConv, timm's EdgeResidual and ConvBnAct) the conv + BN + SiLU layers are swapped; the
block's own forward adds the residual. The TF ports' strided
depthwise convs (timm's Conv2dSame, TF 'same' padding) run the fused op with the
asymmetric padding of each input's size; the report lists them.

`patch(model)` replaces each supported block by an adapter: an instance of a subclass of
the block's own class that shares the block's attribute dictionaries (children, parameters,
buffers, hooks), so state_dict keys, checkpoints and `isinstance` checks are unchanged. Its
forward runs the project's fused layers (FusedConvBNAct, FusedDWConvBNSiLU,
FusedSqueezeExcitation and the folded eval path) through small "views": fused-layer
instances, not registered in the model, whose `conv`, `bn`, `fc1`, `fc2` are the original
submodules. A part the fused ops cannot compute exactly runs the original modules, and the
report says which and why. Stochastic depth and drop_path are the original modules.

An adapter reads its block's current children: when one was replaced after patching
(model surgery) or the skip connection switched, its views are rebuilt from what is
there now, and parts that no longer fuse run the new modules. A block whose inner modules
carry hooks (or while global module hooks exist) runs its original forward, so the hooks
fire and see what they see unpatched. `effnet_fast.freeze` folds a patched model's
BatchNorms for inference.
"""
from dataclasses import dataclass, field

from torch import nn

from .nn.batch_norm import bn_silu
from .nn.layers import (FusedConvBNAct, FusedDWConvBNSiLU, FusedSqueezeExcitation, has_hooks, inner_modules,
                        is_same_padded)
from .ops.backends import check_fused_setting
from .ops.dwconv_bn_silu import KERNEL_SIZES, STRIDES

ORIGINAL = "_patch_original"  # key, in an adapter's __dict__, of the module it replaced
VIEWS = "_patch_views"        # key of its fused views (kept out of _modules: not in state_dict)
STRUCTURE = "_patch_structure"  # key of the children (and skip flag) the views were built from


@dataclass
class PatchReport:
    """What `patch` replaced and what it left alone (module path, reason); `same_padding`:
    the depthwise convs with TF 'same' padding (Conv2dSame) that run fused."""
    replaced: list = field(default_factory=list)
    left_alone: list = field(default_factory=list)
    same_padding: list = field(default_factory=list)

    def __str__(self):
        lines = [f"replaced {len(self.replaced)} modules, left {len(self.left_alone)} parts alone"]
        if self.same_padding:
            lines.append(f"  fused {len(self.same_padding)} depthwise convs with TF 'same' padding (Conv2dSame): "
                         + ", ".join(self.same_padding))
        lines += [f"  left alone {path}: {why}" for path, why in self.left_alone]
        return "\n".join(lines)


def patch(model, fused=True):
    """Swap, in place, the supported blocks of a torchvision or timm EfficientNet for
    adapters running the fused ops on backend `fused` (True/'auto' or a backend name).
    Returns a PatchReport. Parts the fused ops cannot compute exactly are left as they were."""
    check_fused_setting(fused)
    if not fused:
        raise ValueError("patch(model, fused=...) needs True, 'auto' or a backend name; use unpatch(model)")
    report = PatchReport()
    _patch_children(model, "", fused, report)
    return report


def unpatch(model):
    """Put back, in place, every module `patch` replaced (the original objects)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Patched):
                original = child.__dict__[ORIGINAL]
                original.training = child.training
                setattr(parent, name, original)
    return model


def _patch_children(parent, prefix, backend, report):
    for name, child in list(parent.named_children()):
        path = prefix + name
        if isinstance(child, Patched):
            continue
        adapter = _adapt(child, path, backend, report)
        if adapter is not None:
            setattr(parent, name, adapter)
            report.replaced.append((path, type(child).__name__))
        else:
            _patch_children(child, path + ".", backend, report)


def _adapt(module, path, backend, report):
    """The adapter for `module`, or None when it is not a layer this module handles."""
    kind = kind_of(module)
    if kind in ("timm_inverted_residual", "timm_depthwise_separable"):
        problem = _timm_block_problem(module)
        if problem:
            report.left_alone.append((path, problem))
            return None
    if kind in BLOCK_KINDS:
        return _adapter(module, PatchedBlock, _block_views(module, kind, path, backend, report), kind, backend)
    if kind == "torchvision_conv_norm_act":
        views = _layer_views(module, path, backend, report)
        if views is None:
            return None
        return _adapter(module, PatchedLayer, views, kind, backend)
    if kind == "timm_batch_norm_act":
        problem = _bn_problem(module)
        if not problem and _bn_act(module) is None:
            return None  # a BatchNorm without activation (a projection's): nothing to fuse it with
        if problem or not isinstance(module.act, nn.SiLU):
            report.left_alone.append((path, problem or f"activation {type(module.act).__name__}, not SiLU"))
            return None
        return _adapter(module, PatchedBatchNormAct, {}, kind, backend)
    return None


BLOCK_KINDS = ("torchvision_mbconv", "timm_inverted_residual", "timm_depthwise_separable")


def kind_of(module):
    """Which known layer `module` is, by its exact class (a subclass may compute anything)."""
    cls = type(module)
    known = {
        ("torchvision.models.efficientnet", "MBConv"): "torchvision_mbconv",
        ("torchvision.models.efficientnet", "FusedMBConv"): "torchvision_fused_mbconv",
        ("torchvision.ops.misc", "Conv2dNormActivation"): "torchvision_conv_norm_act",
        ("timm.models._efficientnet_blocks", "InvertedResidual"): "timm_inverted_residual",
        ("timm.models._efficientnet_blocks", "DepthwiseSeparableConv"): "timm_depthwise_separable",
        ("timm.models._efficientnet_blocks", "EdgeResidual"): "timm_edge_residual",
        ("timm.models._efficientnet_blocks", "ConvBnAct"): "timm_conv_bn_act",
        ("timm.layers.norm_act", "BatchNormAct2d"): "timm_batch_norm_act",
        ("torchvision.models.efficientnet", "EfficientNet"): "torchvision_efficientnet",
        ("timm.models.efficientnet", "EfficientNet"): "timm_efficientnet",
    }
    return known.get((cls.__module__, cls.__name__))


# --- what the fused ops compute exactly ------------------------------------------------

def _conv_problem(conv, plain_only=False, depthwise=False, pointwise=False, same_ok=False):
    """None when the fused ops compute `conv` exactly, else the reason. A conv with TF
    'same' padding (Conv2dSame) is exact as a depthwise conv, where the fused op pads as
    it does, or where the caller pads it (same_ok)."""
    same = (depthwise or same_ok) and is_same_padded(conv)
    if type(conv) is not nn.Conv2d and not same:
        if type(conv).__name__ == "Conv2dSame":
            return ("Conv2dSame: TF 'same' padding, asymmetric for stride 2 (fused only as a depthwise conv; "
                    "the folded convs pad symmetrically)")
        return f"{type(conv).__name__}, not a plain nn.Conv2d"
    if conv.dilation != (1, 1):
        return f"dilated conv {conv.dilation}"
    if conv.padding_mode != "zeros":
        return f"padding mode {conv.padding_mode!r}"
    if plain_only:
        return None
    k = conv.kernel_size
    if conv.bias is not None:
        return "conv with bias"
    if depthwise:
        if not conv.groups == conv.in_channels == conv.out_channels:
            return "not a depthwise conv"
        if k[0] != k[1] or k[0] not in KERNEL_SIZES:
            return f"kernel size {k} (fused: {KERNEL_SIZES})"
        if conv.stride[0] != conv.stride[1] or conv.stride[0] not in STRIDES:
            return f"stride {conv.stride} (fused: {STRIDES})"
        if conv.padding != ((0, 0) if same else (k[0] // 2, k[0] // 2)):
            return f"padding {conv.padding}, not k // 2"
    if pointwise and (k != (1, 1) or conv.stride != (1, 1) or conv.padding != (0, 0) or conv.groups != 1):
        return "not a 1x1 conv with stride 1, no padding, one group"
    return None


def conv_bn_problem(conv, bn, act, same_padding_ok=False):
    """None when conv + BN (+ act, None or SiLU) is a plain conv, a BatchNorm and SiLU (or
    nothing), which the fused and frozen layers compute exactly; else the reason.
    same_padding_ok: a conv with TF 'same' padding (Conv2dSame) counts as plain (the
    frozen layers pad as it does)."""
    return _conv_problem(conv, plain_only=True, same_ok=same_padding_ok) or _bn_problem(bn) or _act_problem(act)


def _bn_problem(bn):
    if type(bn) is not nn.BatchNorm2d and kind_of(bn) != "timm_batch_norm_act":
        return f"{type(bn).__name__}, not a BatchNorm2d"
    drop = getattr(bn, "drop", None)  # timm BatchNormAct2d
    if drop is not None and not isinstance(drop, nn.Identity):
        return f"dropout {type(drop).__name__} inside the BatchNorm"
    return None


def _act_problem(act):
    if act is None or isinstance(act, nn.SiLU):
        return None
    return f"activation {type(act).__name__}, not SiLU"


def _bn_act(bn):
    """The activation inside a timm BatchNormAct2d (None for Identity)."""
    act = getattr(bn, "act", None)
    return None if act is None or isinstance(act, nn.Identity) else act


def _timm_block_problem(block):
    if getattr(block, "conv_s2d", None) is not None:
        return "space-to-depth stem conv"
    if not isinstance(getattr(block, "aa", nn.Identity()), nn.Identity):
        return "anti-aliasing layer"
    return None


# --- block parts: (modules for the fused view, or the reference modules) ----------------

@dataclass
class _Parts:
    """The modules of one inverted-residual block, in order. expand/dw/project are
    (conv, bn, has_act); tail_reference: the modules computing se + project as the original."""
    expand: tuple
    dw: tuple
    dw_reference: nn.Module
    expand_reference: nn.Module
    se: tuple            # (fc1, act, fc2, gate) or None
    project: tuple
    tail_reference: nn.Module
    has_skip: bool
    drop_path: str


def block_parts(block, kind):
    """The _Parts of a torchvision or timm inverted-residual block (by `kind_of`), as its
    children are now; None for a timm block with parts the fused layers do not handle."""
    if kind == "torchvision_mbconv":
        return _torchvision_parts(block)
    return None if _timm_block_problem(block) else _timm_parts(block, kind)


def _torchvision_parts(block):
    layers = list(block.block)
    expand = layers[0] if len(layers) == 4 else None
    dw, se, project = layers[-3:]
    return _Parts(
        expand=None if expand is None else (expand[0], expand[1], expand[2] if len(expand) > 2 else None),
        dw=(dw[0], dw[1], dw[2] if len(dw) > 2 else None), dw_reference=dw, expand_reference=expand,
        se=(se.fc1, se.activation, se.fc2, se.scale_activation) if type(se).__name__ == "SqueezeExcitation"
        and isinstance(se.avgpool, nn.AdaptiveAvgPool2d) and se.avgpool.output_size in (1, (1, 1)) else None,
        project=(project[0], project[1], project[2] if len(project) > 2 else None),
        tail_reference=nn.Sequential(se, project), has_skip=block.use_res_connect, drop_path="stochastic_depth")


def _timm_parts(block, kind):
    if kind == "timm_inverted_residual":
        expand = (block.conv_pw, block.bn1, _bn_act(block.bn1))
        dw, project = (block.conv_dw, block.bn2), (block.conv_pwl, block.bn3)
    else:
        expand, dw, project = None, (block.conv_dw, block.bn1), (block.conv_pw, block.bn2)
    se = block.se
    is_se = type(se).__name__ == "SqueezeExcite"
    return _Parts(
        expand=expand, dw=(*dw, _bn_act(dw[1])), dw_reference=nn.Sequential(*dw),
        expand_reference=None if expand is None else nn.Sequential(*expand[:2]),
        se=(se.conv_reduce, se.act1, se.conv_expand, se.gate) if is_se else None,
        project=(*project, _bn_act(project[1])), tail_reference=nn.Sequential(se, *project),
        has_skip=block.has_skip, drop_path="drop_path")


def _block_views(block, kind, path, backend, report):
    """The views of a block: fused layers over its current children where they compute
    the block exactly, its own modules elsewhere (each recorded in `report`)."""
    parts = block_parts(block, kind)
    if parts is None:
        return None  # a timm block that gained a part the fused layers do not handle
    views = {"expand": parts.expand_reference, "dw": parts.dw_reference, "se": None, "project": None,
             "tail": parts.tail_reference, "has_skip": parts.has_skip, "drop_path": parts.drop_path}
    if parts.expand is not None:
        conv, bn, act = parts.expand
        problem = conv_bn_problem(conv, bn, act)
        if problem:
            report.left_alone.append((f"{path} expand", problem))
        else:
            views["expand"] = _conv_bn_view(conv, bn, act is not None, backend)
    conv, bn, act = parts.dw
    problem = (_conv_problem(conv, depthwise=True) or _bn_problem(bn)
               or ("no SiLU after the depthwise conv" if not isinstance(act, nn.SiLU) else None))
    if problem:
        report.left_alone.append((f"{path} depthwise", problem))
    else:
        views["dw"] = _view(FusedDWConvBNSiLU, backend, conv=conv, bn=bn)
        if is_same_padded(conv):
            report.same_padding.append(f"{path} depthwise")
    problem = se_project_problem(parts)
    if problem:
        report.left_alone.append((f"{path} squeeze-excitation + projection", problem))
    else:
        fc1, _, fc2, _ = parts.se
        views["se"] = _view(FusedSqueezeExcitation, backend, fc1=fc1, fc2=fc2)
        views["project"] = _conv_bn_view(*parts.project[:2], False, backend)
    return views


def _layer_views(layer, path, backend, report):
    """The view of a torchvision Conv2dNormActivation, or None when it does not fuse."""
    conv, bn = layer[0], layer[1]
    act = layer[2] if len(layer) > 2 else None
    problem = conv_bn_problem(conv, bn, act)
    if problem:
        report.left_alone.append((path, problem))
        return None
    return {"layer": _conv_bn_view(conv, bn, act is not None, backend)}


def se_project_problem(parts):
    """None when the SE + projection of `parts` fuse into one op; else the reason."""
    if parts.se is None:
        return "not a squeeze-excitation layer the fused ops compute"
    fc1, act, fc2, gate = parts.se
    for fc in (fc1, fc2):
        if type(fc) is not nn.Conv2d or fc.bias is None or fc.kernel_size != (1, 1) or fc.stride != (1, 1) \
                or fc.padding != (0, 0) or fc.groups != 1 or fc.dilation != (1, 1):
            return "squeeze-excitation convs are not 1x1 with bias"
    if not isinstance(act, nn.SiLU) or not isinstance(gate, nn.Sigmoid):
        return f"squeeze-excitation activations {type(act).__name__}/{type(gate).__name__}, not SiLU/Sigmoid"
    conv, bn, act = parts.project
    return (_conv_problem(conv, pointwise=True) or _bn_problem(bn)
            or (f"activation {type(act).__name__} after the projection" if act is not None else None))


def fused_mbconv_parts(block, kind):
    """EfficientNetV2's Fused-MBConv blocks of torchvision (FusedMBConv) and timm
    (EdgeResidual, ConvBnAct): ((conv, bn, act), (conv, bn, act) of the projection or None,
    has_skip), or None for a timm block with parts besides those."""
    if kind == "torchvision_fused_mbconv":
        layers = [(m[0], m[1], m[2] if len(m) > 2 else None) for m in block.block]
        return layers[0], (layers[1] if len(layers) > 1 else None), block.use_res_connect
    if _timm_block_problem(block):
        return None
    if kind == "timm_conv_bn_act":
        return (block.conv, block.bn1, _bn_act(block.bn1)), None, block.has_skip
    if not isinstance(block.se, nn.Identity):
        return None
    return ((block.conv_exp, block.bn1, _bn_act(block.bn1)), (block.conv_pwl, block.bn2, _bn_act(block.bn2)),
            block.has_skip)


# --- views and adapters ----------------------------------------------------------------

def _view(cls, backend, **children):
    """An instance of fused layer `cls` whose submodules are `children` (the model's own)."""
    view = cls.__new__(cls)
    nn.Module.__init__(view)
    for name, child in children.items():
        view.add_module(name, child)
    view.backend = backend
    return view


def _conv_bn_view(conv, bn, act, backend):
    view = _view(FusedConvBNAct, backend, conv=conv, bn=bn)
    if act:
        view.act = nn.SiLU(inplace=True)  # FusedConvBNAct applies SiLU when it has `act`
    return view


_adapter_classes = {}


def _adapter(module, cls, views, kind, backend):
    """`module` as an instance of a subclass of (cls, type(module)) sharing its attribute
    dictionaries: same children, parameters, buffers and hooks, so the same state_dict."""
    key = (cls, type(module))
    if key not in _adapter_classes:
        _adapter_classes[key] = type(f"Fused{type(module).__name__}", key, {"__module__": __name__})
    new = _adapter_classes[key].__new__(_adapter_classes[key])
    new.__dict__.update(module.__dict__)
    new.__dict__[ORIGINAL] = module
    new.__dict__[VIEWS] = views
    new.__dict__["_patch_kind"], new.__dict__["_patch_backend"] = kind, backend
    new.__dict__[STRUCTURE] = _structure(new)
    return new


def _structure(adapter):
    """What an adapter's views are built from: its submodules (the objects) and skip flag."""
    skip = getattr(adapter, "use_res_connect", getattr(adapter, "has_skip", None))
    return tuple(inner_modules(adapter)), skip


def _same_structure(a, b):
    return a[1] == b[1] and len(a[0]) == len(b[0]) and all(x is y for x, y in zip(a[0], b[0]))


class Patched(nn.Module):
    """Base of the adapters `patch` installs."""

    def _views(self):
        """The fused views of the current children, in this module's training mode (they
        are not its children); rebuilt when a child was replaced since they were built.
        None when the module should run its original forward: inner hooks, or no view."""
        structure = _structure(self)
        if has_hooks(structure[0]):
            return None
        if not _same_structure(structure, self.__dict__[STRUCTURE]):
            self.__dict__[VIEWS] = self._build_views()
            self.__dict__[STRUCTURE] = structure
        views = self.__dict__[VIEWS]
        if views is None:
            return None
        for view in views.values():
            if isinstance(view, nn.Module):
                view.training = self.training  # the view's own flag only: its children are the model's
        return views

    def _build_views(self):
        return {}

    def _reference_forward(self, x):
        return type(self.__dict__[ORIGINAL]).forward(self, x)


class PatchedLayer(Patched):
    """Conv + BN (+ SiLU) as FusedConvBNAct."""

    def _build_views(self):
        return _layer_views(self, "", self.__dict__["_patch_backend"], PatchReport())

    def forward(self, x):
        views = self._views() if x.numel() else None
        if views is None:
            return self._reference_forward(x)
        return views["layer"](x)


class PatchedBatchNormAct(Patched):
    """timm's BatchNormAct2d with SiLU as the fused bn_silu op."""

    def forward(self, x):
        original = self.__dict__[ORIGINAL]  # shares this adapter's children; its class is timm's
        if x.numel() == 0 or x.dim() != 4 or self._views() is None or _bn_problem(original) \
                or not isinstance(original.act, nn.SiLU):
            return self._reference_forward(x)  # an activation or dropout replaced after patching
        return bn_silu(x, self, self.__dict__["_patch_backend"])


class PatchedBlock(Patched):
    """An inverted-residual block computed as effnet_fast.nn.MBConv computes it."""

    def _build_views(self):
        return _block_views(self, self.__dict__["_patch_kind"], "", self.__dict__["_patch_backend"], PatchReport())

    def forward(self, x):
        views = self._views() if x.numel() else None
        if views is None:
            return self._reference_forward(x)
        h = x if views["expand"] is None else views["expand"](x)
        h = views["dw"](h)
        se, project = views["se"], views["project"]
        if se is None:
            out = views["tail"](h)
        else:
            out = project.bn(se.forward_project(h, project.conv))
        if views["has_skip"]:
            out = getattr(self, views["drop_path"])(out) + x
        return out


__all__ = ["patch", "unpatch", "PatchReport"]
