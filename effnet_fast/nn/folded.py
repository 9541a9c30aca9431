"""Inference with every BatchNorm folded into the convolution before it.

In eval mode a BatchNorm is a per-channel affine map, so conv + BN is one conv with
scaled weights and a bias. When nothing needs gradients, the fused layers run:
  stem, expand, head   conv + bias + SiLU in one pass: oneDNN's fused post-op on the
                       CPU (the kernel torch.compile's freezing path calls), weights
                       reordered once into oneDNN's blocked layout;
  depthwise            the same, with oneDNN's depthwise conv on the CPU (faster there
                       than the fused kernel, which serves training and other devices);
  SE + projection      the gate folded into the projection weights per sample,
                       conv(x * g[n]) = x[n] @ (W * g[n]), one batched GEMM, with the
                       projection BN's bias and the residual added to its output, so
                       the gated tensor is never written.

The folded weights are a cache derived from parameters and running statistics: held
outside the modules (never in state_dict, not copied or pickled with them) and
rebuilt when any of their sources changes (a new tensor, storage or version counter:
an optimizer step, load_state_dict, an in-place edit). Writes through `.data`
bypass version counters and are not seen.
"""
import threading
import weakref

import torch
import torch.nn.functional as F

_cache = weakref.WeakKeyDictionary()        # module -> (stamp of its sources, folded tensors)
_chunk_plans = weakref.WeakKeyDictionary()  # model -> {input shape: chunk plan}
_model_checked = threading.local()          # .active: inside run_in_chunks, the model passed applies()


def _stamp(tensors):
    return tuple((id(t), t.data_ptr(), t._version, t.device, t.dtype) for t in tensors)


def _cached(module, sources, build, extra=()):
    """build(), remembered for `module` until one of the tensors `sources` (or `extra`) changes."""
    key = (_stamp(sources), extra)
    hit = _cache.get(module)
    if hit is not None and hit[0] == key:
        return hit[1]
    value = build()
    _cache[module] = (key, value)
    return value


def applies(module, x):
    """True when `module` may run folded on `x`: it and every submodule in eval mode, each
    BatchNorm with running statistics, no gradient needed, not under autocast (which
    picks the convolutions' dtype), and no transform looking on (torch.compile folds
    by itself; jit.trace and vmap get the fused layers' own errors)."""
    if getattr(_model_checked, "active", False):  # the whole model's answer holds for its layers
        return True
    if module.training or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if torch.is_autocast_enabled(x.device.type) or torch._C._functorch.is_batchedtensor(x):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters())):
        return False
    return _all_eval_with_statistics(module)


def _all_eval_with_statistics(module):
    """No module below `module` in training mode, every BatchNorm with running statistics.
    Walked on every call (submodules may be swapped or switched), so kept cheaper than
    Module.modules()."""
    if module.training or (isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
                           and module.running_mean is None):
        return False
    return all(_all_eval_with_statistics(m) for m in module._modules.values() if m is not None)


def fold_bn_into_conv(conv_weight, bn):
    """(weight, bias) of the conv equal to bn(conv(x)) in eval mode, for a conv without
    bias of weight (C_out, C_in / groups, kh, kw) and BatchNorm `bn` over C_out channels;
    in float64 for float64 weights, else float32."""
    acc = torch.float64 if conv_weight.dtype == torch.float64 else torch.float32
    scale = torch.rsqrt(bn.running_var.to(acc) + bn.eps)
    bias = -bn.running_mean.to(acc) * scale
    if bn.weight is not None:  # affine
        scale = scale * bn.weight.to(acc)
        bias = bn.bias.to(acc) + bias * bn.weight.to(acc)
    return conv_weight.to(acc) * scale.view(-1, *([1] * (conv_weight.dim() - 1))), bias


def _sources(conv, bn):
    return tuple(t for t in (conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var) if t is not None)


# oneDNN's fused convolutions (the kernels torch.compile's freezing path calls): a
# private API, so used only when present, with plain torch convolutions otherwise.
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def onednn_ok(x):
    """True when oneDNN's fused convolutions can run on x."""
    return _ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32


def conv_bn_act(module, x, residual=None, act=None):
    """module.bn(module.conv(x)), then SiLU (act, by default when module has `act`) or
    + residual; BN folded. module has .conv and .bn (ConvBNAct, DWConvBNSiLU)."""
    conv, act = module.conv, hasattr(module, "act") if act is None else act
    onednn = onednn_ok(x)
    geometry = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)

    def build():
        weight, bias = fold_bn_into_conv(conv.weight, module.bn)
        weight, bias = weight.to(x.dtype), bias.to(x.dtype)
        if onednn:  # oneDNN's blocked weight layout, reordered once
            weight = torch._C._nn.mkldnn_reorder_conv2d_weight(weight.to_mkldnn(), *geometry, list(x.shape))
        return weight, bias, onednn

    weight, bias, packed = _cached(module, _sources(conv, module.bn), build, (x.device, x.dtype))
    if packed and residual is not None:
        return torch.ops.mkldnn._convolution_pointwise.binary(x, residual, weight, bias, *geometry, "add", 1.0,
                                                             None, [], None)
    if packed:
        return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, *geometry, "swish" if act else "none",
                                                       [], "")
    y = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    if residual is not None:
        return y.add_(residual)
    return F.silu(y, inplace=True) if act else y


# Below this many pixels per sample, the projection GEMM of one sample is too short to
# run well on its own: scale the input by the gate and run one convolution instead.
PER_SAMPLE_GEMM_PIXELS = 2048


def se_project(h, gate, project, residual, se_scale):
    """project(h * gate[:, :, None, None]) (+ residual) for a ConvBNAct `project` without
    activation, BN folded. On large maps the gate goes into per-sample projection weights
    (one batched GEMM, h * gate never written); on small ones se_scale(h, gate) feeds one
    convolution."""
    n, c_mid, height, width = h.shape
    if height * width < PER_SAMPLE_GEMM_PIXELS:
        return conv_bn_act(project, se_scale(h, gate), residual)

    def build():
        weight, bias = fold_bn_into_conv(project.conv.weight, project.bn)
        return weight.flatten(1), bias

    # Kept under project.bn: the slot of `project` itself holds conv_bn_act's oneDNN weights.
    weight, bias = _cached(project.bn, _sources(project.conv, project.bn), build)
    c_out = weight.shape[0]
    w_n = (weight.unsqueeze(0) * gate.unsqueeze(1)).to(h.dtype)     # (N, C_out, C_mid)
    bias = bias.to(h.dtype)
    if h.is_contiguous(memory_format=torch.channels_last) and not h.is_contiguous():
        rows = h.permute(0, 2, 3, 1).reshape(n, height * width, c_mid)  # a view
        base = bias if residual is None else residual.permute(0, 2, 3, 1).reshape(n, height * width, c_out)
        out = torch.baddbmm(base, rows, w_n.transpose(1, 2))
        out = out.view(n, height, width, c_out).permute(0, 3, 1, 2)
    else:
        cols = h.reshape(n, c_mid, height * width)
        base = bias.view(1, c_out, 1) if residual is None else residual.reshape(n, c_out, height * width)
        out = torch.baddbmm(base, w_n, cols).view(n, c_out, height, width)
    if residual is not None:
        out += bias.view(1, c_out, 1, 1)
    return out


# Largest activation a chunk of the batch may write: well inside the last-level cache
# and below glibc's mmap threshold (at most 32 MiB), so that a chunk's intermediates
# are served from memory the allocator keeps instead of freshly faulted pages (a
# whole batch-16 B0 forward otherwise takes some 30,000 page faults).
CHUNK_BYTES = 16 << 20


def _peak_bytes(module, height, width, element_size):
    """(bytes of the largest activation `module` writes per sample, its output H, W)."""
    peak = 0
    for conv in (m for m in module.modules() if isinstance(m, torch.nn.Conv2d)):
        height, width = (_conv_out(size, conv, i) for i, size in enumerate((height, width)))
        peak = max(peak, conv.out_channels * height * width * element_size)
    return peak, height, width


def _conv_out(size, conv, dim):
    span = conv.dilation[dim] * (conv.kernel_size[dim] - 1) + 1
    return (size + 2 * conv.padding[dim] - span) // conv.stride[dim] + 1


def _chunk_plan(stages, x):
    """[(number of chunks, number of stages)]: consecutive stages that run on the same
    batch chunks. Depends on the input's shape and the model's structure alone."""
    if x.device.type != "cpu":  # a GPU wants the whole batch at once
        return [(1, len(stages))]
    n, height, width = x.shape[0], x.shape[2], x.shape[3]
    plan = []
    for stage in stages:
        peak, height, width = _peak_bytes(stage, height, width, x.element_size())
        chunks = min(n, max(1, -(-n * peak // CHUNK_BYTES)))
        if plan and plan[-1][0] == chunks:
            plan[-1][1] += 1
        else:
            plan.append([chunks, 1])
    return [tuple(step) for step in plan]


def run_in_chunks(model, stages, x):
    """The stages applied to x in order, each group of stages over chunks of the batch
    small enough to stay in cache (see CHUNK_BYTES); the chunks' outputs are joined
    between groups. Only for eval mode: every sample is computed independently."""
    plans = _chunk_plans.setdefault(model, {})
    key = (tuple(x.shape), x.dtype, x.device, tuple(map(id, stages)))  # a plan is only chunk counts
    if key not in plans:
        if len(plans) > 16:
            plans.clear()
        plans[key] = _chunk_plan(stages, x)
    outer, _model_checked.active = getattr(_model_checked, "active", False), True
    try:
        return _run_plan(plans[key], stages, x)
    finally:
        _model_checked.active = outer


def _run_plan(plan, stages, x):
    first = 0
    for chunks, count in plan:
        group = stages[first:first + count]
        first += count
        outs = []
        for part in x.tensor_split(chunks):
            for stage in group:
                part = stage(part)
            outs.append(part)
        x = outs[0] if chunks == 1 else torch.cat(outs)
    return x
