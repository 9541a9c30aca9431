"""The modules of a frozen inference model (effnet_fast.freeze): every BatchNorm folded
into the convolution before it, once, into weights the frozen model owns.

In eval mode a BatchNorm is a per-channel affine map, so conv + BN is one conv with
scaled weights and a bias. A frozen model runs:
  stem, expand, head   conv + bias + SiLU in one pass: oneDNN's fused post-op on the
                       CPU (the kernel torch.compile's freezing path calls), its weights
                       reordered once into oneDNN's blocked layout;
  depthwise            the same, with oneDNN's depthwise conv on the CPU;
  SE + projection      the gate folded into the projection weights per sample,
                       conv(x * g[n]) = x[n] @ (W * g[n]), one batched GEMM, with the
                       projection's folded bias and the residual added to its output, so
                       the gated tensor is never written.

The folded weights are copies, taken when the model is frozen: nothing a later change of
the source model does (an optimizer step, load_state_dict, new BatchNorm statistics or
eps) reaches them. They are buffers of the frozen modules (its state_dict); oneDNN's
reordered copy of a weight is derived from them on the first call and dropped whenever
the buffers are replaced (`.to()`, load_state_dict). Frozen modules refuse train() and
gradients.
"""
import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.backends import kernels, resolve_backend
from ..ops.common import as_supported_layout
from ..ops.common import is_channels_last
from ..ops.squeeze_excite import se_gate
from .layers import is_same_padded, same_padding

# oneDNN's fused convolutions (the kernels torch.compile's freezing path calls): a
# private API, so used only when present, with plain torch convolutions otherwise.
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")

FROZEN_HINT = ("a frozen model is for inference only (effnet_fast.freeze); train or fine-tune the model it was "
               "frozen from, then freeze it again")


def fold_bn_into_conv(conv_weight, bn, conv_bias=None):
    """(weight, bias) of the conv equal to bn(conv(x)) in eval mode, for a conv of weight
    (C_out, C_in / groups, kh, kw) and optional bias (C_out,), and BatchNorm `bn` over
    C_out channels; in float64 for float64 weights, else float32."""
    if bn.running_mean is None:
        raise ValueError(f"{type(bn).__name__}({bn.num_features}) has no running statistics "
                         "(track_running_stats=False): it normalises with each batch's own statistics, which "
                         "no fixed conv can do; it cannot be folded")
    acc = torch.float64 if conv_weight.dtype == torch.float64 else torch.float32
    scale = torch.rsqrt(bn.running_var.to(acc) + bn.eps)
    bias = -bn.running_mean.to(acc) * scale
    if bn.weight is not None:  # affine
        scale = scale * bn.weight.to(acc)
        bias = bn.bias.to(acc) + bias * bn.weight.to(acc)
    if conv_bias is not None:
        bias = bias + conv_bias.to(acc) * scale
    return conv_weight.to(acc) * scale.view(-1, *([1] * (conv_weight.dim() - 1))), bias


def _onednn_dtypes():
    dtypes = {torch.float32}
    if _ONEDNN and torch.ops.mkldnn._is_mkldnn_bf16_supported():  # AVX-512 or AVX-NE-CONVERT
        dtypes.add(torch.bfloat16)
    return frozenset(dtypes)


ONEDNN_DTYPES = _onednn_dtypes()
LOW_PRECISION = (torch.bfloat16, torch.float16)


def onednn_ok(x):
    """True when oneDNN's fused convolutions can run on x (float32, or bfloat16 on a CPU
    with bfloat16 instructions)."""
    return _ONEDNN and x.device.type == "cpu" and x.dtype in ONEDNN_DTYPES


class FrozenModule(nn.Module):
    """Base of the frozen modules: always in eval mode, no parameters, no gradients."""

    def __init__(self):
        super().__init__()
        self.training = False

    def train(self, mode=True):
        if mode:
            raise RuntimeError(f"{type(self).__name__}.train(): {FROZEN_HINT}")
        return super().train(False)


class FrozenConv(FrozenModule):
    """conv (+ its BatchNorm, folded) (+ SiLU, or + a residual), eval only.

    Built from an nn.Conv2d (its bias, if any, folded too) and an optional BatchNorm;
    copies their current values. Input (N, C_in, H, W), NCHW or channels_last."""

    @torch.no_grad()
    def __init__(self, conv, bn=None, act=False):
        super().__init__()
        weight = conv.weight.detach()
        bias = conv.bias.detach() if conv.bias is not None else None
        if bn is not None:
            weight, bias = fold_bn_into_conv(weight, bn, bias)
        elif bias is None:
            bias = weight.new_zeros(weight.shape[0])
        dtype = conv.weight.dtype
        self.register_buffer("weight", weight.to(dtype).clone())
        self.register_buffer("bias", bias.to(dtype).clone())
        self.stride, self.padding, self.dilation = tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation)
        self.groups, self.kernel_size, self.out_channels = conv.groups, tuple(conv.kernel_size), conv.out_channels
        self.act, self.folded_bn = act, bn is not None
        # TF 'same' padding (Conv2dSame, padding 0): zeros added per input size, as the conv did
        self.same = is_same_padded(conv)
        self._packed = None  # oneDNN's reordered weight, made on the first CPU call

    def _apply(self, fn, *args, **kwargs):
        self._packed = None  # derived from the buffers about to be replaced
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self._packed = None
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_packed"] = None  # an opaque oneDNN tensor: rebuilt after unpickling
        return state

    def _geometry(self, padding=None):
        return list(padding or self.padding), list(self.stride), list(self.dilation), self.groups

    def _onednn_weight(self, x, geometry):
        if self._packed is None:
            self._packed = torch._C._nn.mkldnn_reorder_conv2d_weight(self.weight.to_mkldnn(), *geometry,
                                                                     list(x.shape))
        return self._packed

    def _pad_same(self, x):
        """(x, padding) for TF 'same' padding: where its zeros are the same on both sides of
        each dim (odd sizes at stride 2, every stride-1 conv) the conv pads them itself (x
        as it is); otherwise (asymmetric: the oneDNN op takes one padding per dim) x with
        the zeros written by a pad copy, in x's layout, and padding 0."""
        top, bottom, left, right = same_padding(self, x)
        if top == bottom and left == right:
            return x, (top, left)
        padded = F.pad(x, (left, right, top, bottom))
        return (padded.contiguous(memory_format=torch.channels_last) if is_channels_last(x) else padded), (0, 0)

    def forward(self, x, residual=None):
        padding = self.padding
        if self.same:
            x, padding = self._pad_same(x)
        if onednn_ok(x) and self.weight.dtype == x.dtype:
            geometry = self._geometry(padding)
            weight = self._onednn_weight(x, geometry)
            if residual is not None:
                return torch.ops.mkldnn._convolution_pointwise.binary(x, residual, weight, self.bias, *geometry,
                                                                     "add", 1.0, None, [], None)
            return torch.ops.mkldnn._convolution_pointwise(x, weight, self.bias, *geometry,
                                                           "swish" if self.act else "none", [], "")
        y = F.conv2d(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups)
        if residual is not None:
            return y.add_(residual)
        return F.silu(y, inplace=True) if self.act else y

    def extra_repr(self):
        kind = "depthwise conv" if self.groups == self.out_channels and self.groups > 1 else "conv"
        k = "x".join(map(str, self.kernel_size))
        return (f"{kind} {k}, {self.out_channels} channels, stride {self.stride[0]}"
                f"{', TF same padding' if self.same else ''}"
                f"{', BatchNorm folded' if self.folded_bn else ''}{', SiLU' if self.act else ''}")


# Below this many pixels per sample, the projection GEMM of one sample is too short to
# run well on its own: scale the input by the gate and run one convolution instead.
PER_SAMPLE_GEMM_PIXELS = 2048


class FrozenMBConv(FrozenModule):
    """An inverted-residual block with its BatchNorms folded: [expand] -> depthwise ->
    squeeze-excitation -> projection (+ the input when the block keeps its shape).

    expand, dw, project: FrozenConv; fc1, fc2: the SE's 1x1 convs (with bias, copied);
    backend: the fused backend whose se_pool / se_scale kernels run (True: the fastest
    built one for the input's device, the reference kernels when none is)."""

    def __init__(self, expand, dw, fc1, fc2, project, has_skip, backend=True):
        super().__init__()
        self.expand, self.dw, self.project = expand, dw, project
        for name, fc in (("fc1", fc1), ("fc2", fc2)):
            self.register_buffer(f"{name}_weight", fc.weight.detach().clone())
            self.register_buffer(f"{name}_bias", fc.bias.detach().clone())
        self.has_skip, self.backend = has_skip, backend

    def forward(self, x):
        h = self.dw(x if self.expand is None else self.expand(x))
        k = kernels(_backend(self.backend, h.device))
        h = as_supported_layout(h)
        gate = se_gate(k.se_pool(h), self.fc1_weight, self.fc1_bias, self.fc2_weight, self.fc2_bias)
        return se_project(h, gate, self.project, x if self.has_skip else None, k.se_scale)

    def extra_repr(self):
        return f"residual={self.has_skip}"


def _backend(backend, device):
    """The backend of `backend` for `device`; with True, the reference kernels when no
    fused backend is built for it (a named backend that cannot run raises)."""
    try:
        return resolve_backend(backend, device)
    except RuntimeError:
        if backend is True or backend == "auto":
            return "reference"
        raise


def se_project(h, gate, project, residual, se_scale):
    """project(h * gate[:, :, None, None]) (+ residual) for a FrozenConv 1x1 `project`
    without activation. On large maps the gate goes into per-sample projection weights
    (one batched GEMM, h * gate never written); on small ones se_scale(h, gate) feeds one
    convolution."""
    n, c_mid, height, width = h.shape
    if height * width < PER_SAMPLE_GEMM_PIXELS:
        return project(se_scale(h, gate), residual)
    weight, bias = project.weight.flatten(1), project.bias
    c_out = weight.shape[0]
    w_n = (weight.to(gate.dtype).unsqueeze(0) * gate.unsqueeze(1)).to(h.dtype)     # (N, C_out, C_mid)
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


class FrozenFusedMBConv(FrozenModule):
    """EfficientNetV2's Fused-MBConv with its BatchNorms folded: conv + SiLU, then the
    projection when there is one (the residual added by its conv's post-op), else the
    residual added after the SiLU. conv, project: FrozenConv (project None or without act)."""

    def __init__(self, conv, project, has_skip):
        super().__init__()
        self.conv, self.project, self.has_skip = conv, project, has_skip

    def forward(self, x):
        h = self.conv(x)
        residual = x if self.has_skip else None
        if self.project is not None:
            return self.project(h, residual)
        return h if residual is None else h.add_(residual)

    def extra_repr(self):
        return f"residual={self.has_skip}"


class FrozenSequential(FrozenModule):
    """Frozen (or kept) modules applied in order."""

    def __init__(self, modules):
        super().__init__()
        self.layers = nn.ModuleList(modules)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class FrozenClassifier(FrozenModule):
    """A frozen image classifier: `stages` over chunks of the batch (run_in_chunks), the
    global average pool, then a copy of the classifier (nn.Linear; dropout is the
    identity in eval). Input (N, in_channels, H, W), NCHW or channels_last; output
    (N, classes) logits:
      input in the weights' dtype       computed and answered in that dtype;
      float32 input, bfloat16 / float16 weights
                                        cast once, computed in the weights' dtype, answered
                                        in float32 (an inference engine's precision hint);
      under torch.autocast              computed and answered in autocast's dtype, by a
                                        copy of the weights cast once and kept.
    On a CPU without bfloat16 instructions, bfloat16 and float16 compute in float32 from
    the rounded weights (see _model_for).

    `kept` counts the modules that could not be frozen and run as copies of the
    originals in eval mode (the repr names them)."""

    def __init__(self, stages, classifier, in_channels, source, kept=()):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.classifier = classifier
        self.in_channels, self.source, self.kept = in_channels, source, tuple(kept)
        self._chunk_plans = {}
        self._copies = {}  # {dtype: this model cast to dtype}, for autocast

    @property
    def dtype(self):
        """The dtype the frozen weights hold and the layers compute in."""
        return self.classifier.weight.dtype

    def forward(self, x):
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"frozen {self.source} expects a 4-D (N, {self.in_channels}, H, W) input, got shape "
                             f"{tuple(x.shape)}")
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError(f"the input requires grad: {FROZEN_HINT}")
        model, out_dtype = self._model_for(x)
        # inference mode: no autograd dispatch of the custom ops, no version counters; its
        # tensors never leave it (the logits are copied out as an ordinary tensor)
        with torch.inference_mode(), torch.autocast(x.device.type, enabled=False):
            features = model._run_in_chunks(as_supported_layout(x.to(model.dtype)))
            logits = model.classifier(features.mean((2, 3)))
        return logits.to(out_dtype, copy=True)

    def _model_for(self, x):
        """(the frozen model that runs x, the output dtype). Under autocast: a copy with
        the weights in autocast's dtype, output in that dtype as autocast gives it. A
        low-precision model takes float32 inputs too and answers in float32, as an
        inference engine's precision hint does. On a CPU without bfloat16 instructions
        low precision computes in float32, from the low-precision weights (as OpenVINO's
        bf16 hint does there): emulated bfloat16 would be slower and no more exact."""
        low = _autocast_dtype(x.device.type)
        if low is not None and x.is_floating_point():
            compute, out = low, low
        elif x.dtype == self.dtype:
            compute, out = x.dtype, x.dtype
        elif x.dtype == torch.float32 and self.dtype in LOW_PRECISION:
            compute, out = self.dtype, torch.float32
        else:
            raise TypeError(f"frozen {self.source} holds {self.dtype} weights, got a {x.dtype} input: cast the "
                            f"input (x.to({self.dtype})), or freeze with dtype={x.dtype}")
        if x.device.type == "cpu" and compute in LOW_PRECISION and compute not in ONEDNN_DTYPES:
            compute = torch.float32
        return (self if compute == self.dtype else self._copy_in(compute)), out

    def _copy_in(self, dtype):
        """This model with its weights cast to dtype, made once (dropped with the weights)."""
        if dtype not in self._copies:
            self._copies[dtype] = copy.deepcopy(self).to(dtype)
        return self._copies[dtype]

    def _apply(self, fn, *args, **kwargs):
        self._copies = {}  # cast from the buffers about to be replaced
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self._copies = {}
        super()._load_from_state_dict(*args, **kwargs)

    def _run_in_chunks(self, x):
        stages = list(self.stages)
        key = (tuple(x.shape), x.dtype, x.device, tuple(map(id, stages)))  # a plan is only chunk counts
        if key not in self._chunk_plans:
            if len(self._chunk_plans) > 16:
                self._chunk_plans.clear()
            self._chunk_plans[key] = _chunk_plan(stages, x)
        return _run_plan(self._chunk_plans[key], stages, x)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_chunk_plans"], state["_copies"] = {}, {}
        return state

    def extra_repr(self):
        folded = sum(m.folded_bn for m in self.modules() if isinstance(m, FrozenConv))
        p = next(iter(self.buffers()), None)
        where = f", {p.dtype}, {p.device}" if p is not None else ""
        kept = f", kept as they were: {', '.join(self.kept)}" if self.kept else ""
        return f"frozen from {self.source}: {folded} BatchNorms folded into their convs{where}{kept}"


def _autocast_dtype(device_type):
    """autocast's dtype for device_type when autocast is on there, else None."""
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


# Largest activation a chunk of the batch may write: well inside the last-level cache
# and below glibc's mmap threshold (at most 32 MiB), so that a chunk's intermediates
# are served from memory the allocator keeps instead of freshly faulted pages (a
# whole batch-16 B0 forward otherwise takes some 30,000 page faults).
CHUNK_BYTES = 16 << 20


def _peak_bytes(module, height, width, element_size):
    """(bytes of the largest activation `module` writes per sample, its output H, W)."""
    peak = 0
    for conv in (m for m in module.modules() if isinstance(m, (FrozenConv, nn.Conv2d))):
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
