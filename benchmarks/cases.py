"""The benchmark suite's cases: the layer shapes of B0 (and of the other variants named by
--bench-versions, e.g. v2_s: read off each model itself, at its resolution), the
implementations that can run on a device, and for each (op, shape, device, dtype,
layout, mode, implementation) the callable that pytest-benchmark times, checked against
eager PyTorch before it is timed.

Ops: dwconv_bn_silu, squeeze_excite, squeeze_excite_project (SE + the 1x1 projection
conv), bn_silu (BatchNorm + SiLU after the stem, expand and head convs) and model (the
whole network). Implementations: "eager" (the reference nn layers), each fused backend
that runs on the device ("cpu" on a CPU; "triton" and "cuda" on a GPU), and "compile"
(torch.compile of the eager layer, only with --bench-compile).

Modes: "eval" is one no-grad forward with running statistics, "train" one forward +
backward with batch statistics (the model: one SGD step). The fused eval rows of the
single ops call the fused op; the model's fused eval rows time the frozen model
(effnet_fast.freeze: every BatchNorm folded into oneDNN convolutions on a CPU), what a
user serves for inference.
"""
import functools
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from effnet_fast import freeze
from effnet_fast.app.benchmark import calibrate_bn, eval_forward, train_step
from effnet_fast.ops.backends import backends_for

OPS = ("dwconv_bn_silu", "squeeze_excite", "squeeze_excite_project", "bn_silu", "model")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
MODES = ("eval", "train")
# Largest relative error (max |impl - eager| / max |eager|) over the output and gradients.
TOLERANCE = {torch.float32: 2e-3, torch.bfloat16: 4e-2, torch.float16: 1e-2}


# ----------------------------------------------------------------------------- shapes

def model_size(version):
    """The input size of the whole-model cases: the variant's own resolution."""
    from effnet_fast.efficientnet import VARIANTS
    return VARIANTS[version].resolution


def suite_shapes(versions=("b0",)):
    """{op: [shape, ...]}: the distinct layer shapes of the variants, in order (see
    layer_shapes), each once; the model op: one (version,) per variant."""
    merged = {op: [] for op in OPS}
    for version in versions:
        for op, shapes in layer_shapes(version).items():
            merged[op] += [s for s in shapes if s not in merged[op]]
    return merged


@functools.lru_cache(maxsize=None)
def layer_shapes(version="b0"):
    """{op: [shape, ...]}: the distinct layer shapes of an EfficientNet variant at its
    resolution (B0: 224x224), in network order, recorded by forward hooks during one
    forward of effnet_fast's model:
      dwconv_bn_silu          (channels, input size, kernel, stride)
      squeeze_excite          (channels, reduced channels, size)
      squeeze_excite_project  (channels, reduced channels, size, projection channels)
      bn_silu                 (channels, size) of each BatchNorm + SiLU (stem, expand, head,
                              and V2's Fused-MBConv convs)
    """
    from effnet_fast import EfficientNet
    from effnet_fast.nn import ConvBNAct, DWConvBNSiLU, MBConv, SqueezeExcitation
    model = EfficientNet(version).eval()
    found = {op: [] for op in OPS if op != "model"}

    def record(op, shape):
        if shape not in found[op]:
            found[op].append(shape)

    def hook(module, args, _out):
        c, h = args[0].shape[1], args[0].shape[2]
        if isinstance(module, DWConvBNSiLU):
            record("dwconv_bn_silu", (c, h, module.conv.kernel_size[0], module.conv.stride[0]))
        elif isinstance(module, SqueezeExcitation):
            record("squeeze_excite", (c, module.fc1.out_channels, h))
        elif isinstance(module, MBConv):
            pass
        elif isinstance(module, nn.BatchNorm2d):
            record("bn_silu", (c, h))

    def mbconv_hook(module, _args, _out):
        se = module.se
        record("squeeze_excite_project", (se.fc1.in_channels, se.fc1.out_channels, se_size[id(se)],
                                          module.project.conv.out_channels))

    se_size = {}
    handles = []
    for m in model.modules():
        if isinstance(m, (DWConvBNSiLU, SqueezeExcitation)):
            handles.append(m.register_forward_hook(hook))
        if isinstance(m, SqueezeExcitation):
            handles.append(m.register_forward_hook(lambda mod, args, out: se_size.__setitem__(id(mod), args[0].shape[2])))
        if isinstance(m, MBConv):
            handles.append(m.register_forward_hook(mbconv_hook))
        if isinstance(m, ConvBNAct) and hasattr(m, "act"):
            handles.append(m.bn.register_forward_hook(hook))
    with torch.no_grad():
        model(torch.zeros(1, 3, model.resolution, model.resolution))
    for h in handles:
        h.remove()
    found["model"] = [(version,)]
    return found


def shape_id(op, shape):
    if op == "dwconv_bn_silu":
        c, h, k, s = shape
        return f"{c}x{h}k{k}s{s}"
    if op == "squeeze_excite":
        return "{}r{}x{}".format(*shape)
    if op == "squeeze_excite_project":
        return "{}r{}x{}p{}".format(*shape)
    if op == "bn_silu":
        return "{}x{}".format(*shape)
    return shape[0]


# ----------------------------------------------------------------------------- cases

@dataclass(frozen=True)
class Case:
    op: str
    device: str
    dtype: str
    layout: str
    mode: str
    shape: tuple
    impl: str
    batch: int
    max_size: Optional[int] = None  # --bench-quick: spatial sizes capped (correctness runs only)

    @property
    def id(self):
        return "-".join((self.device, self.dtype, self.layout, self.mode, shape_id(self.op, self.shape), self.impl))

    @property
    def group(self):
        """The implementations of one shape and configuration share a group."""
        return " ".join((self.op, shape_id(self.op, self.shape), self.device, self.dtype, self.layout, self.mode,
                         f"batch {self.batch}"))


def implementations(device, compile_rows=False, interpret=False, op=None):
    """Implementation names that can run on `device` (a type name); interpret: Triton on
    the CPU through its interpreter too (single ops only: the whole model takes minutes)."""
    from effnet_fast.ops import resolve_backend
    names = ["eager"]
    interpreted = ("triton",) if interpret and device == "cpu" and op != "model" else ()
    candidates = backends_for(device) + interpreted
    for backend in candidates:
        try:
            resolve_backend(backend, torch.device(device))
        except (RuntimeError, ValueError):
            continue
        names.append(backend)
    if compile_rows:
        names.append("compile")
    return names


def all_cases(op, devices, dtypes, layouts, modes, batch, compile_rows=False, interpret=False, shapes=None,
              max_size=None, versions=("b0",)):
    out = []
    op_shapes = suite_shapes(tuple(versions))[op]
    op_shapes = op_shapes[:shapes] if shapes else op_shapes
    for device in devices:
        impls = implementations(device, compile_rows, interpret, op)
        for dtype in dtypes[device]:
            for layout in layouts:
                for mode in modes:
                    for shape in op_shapes:
                        for impl in impls:
                            out.append(Case(op, device, dtype, layout, mode, shape, impl, batch[device], max_size))
    return out


# ----------------------------------------------------------------------------- builders

@dataclass
class Bench:
    run: Callable  # one call of the implementation (the caller adds the device synchronisation)
    outputs: Callable  # one call, returning the tensors compared with eager's
    nbytes: Optional[int]  # bytes that must move: tensors in + out (train: and their gradients)
    cleanup: list = field(default_factory=list)


class BNSiLU(nn.Module):
    """silu(bn(y)), the reference of effnet_fast.ops.bn_silu."""

    def __init__(self, channels):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, y):
        return F.silu(self.bn(y))


class FusedBNSiLU(BNSiLU):
    def __init__(self, channels, backend):
        super().__init__(channels)
        self.backend = backend

    def forward(self, y):
        from effnet_fast.nn import bn_silu
        return bn_silu(y, self.bn, self.backend)


class SEProject(nn.Module):
    """conv1x1(se(x)): squeeze-excitation followed by the block's projection conv."""

    def __init__(self, se, channels_out):
        super().__init__()
        self.se = se
        self.conv = nn.Conv2d(se.fc1.in_channels, channels_out, 1, bias=False)

    def forward(self, x):
        return self.conv(self.se(x))


class FusedSEProject(SEProject):
    def forward(self, x):
        return self.se.forward_project(x, self.conv)


def _layer_pair(case):
    """(eager module, module for case.impl) with the same weights, and the input size."""
    from effnet_fast.nn import (DWConvBNSiLU, FusedDWConvBNSiLU, FusedSqueezeExcitation,
                                    SqueezeExcitation)
    backend = case.impl
    op, shape = case.op, case.shape
    if op == "dwconv_bn_silu":
        c, h, k, s = shape
        eager = DWConvBNSiLU(c, k, s)
        fused = (lambda: FusedDWConvBNSiLU(c, k, s, backend=backend))
    elif op == "squeeze_excite":
        c, cr, h = shape
        eager = SqueezeExcitation(c, cr)
        fused = (lambda: FusedSqueezeExcitation(c, cr, backend=backend))
    elif op == "squeeze_excite_project":
        c, cr, h, cout = shape
        eager = SEProject(SqueezeExcitation(c, cr), cout)
        fused = (lambda: FusedSEProject(FusedSqueezeExcitation(c, cr, backend=backend), cout))
    elif op == "bn_silu":
        c, h = shape
        eager = BNSiLU(c)
        fused = (lambda: FusedBNSiLU(c, backend))
    else:
        raise ValueError(op)
    if case.impl == "eager":
        return eager, eager, h
    return eager, (None if case.impl == "compile" else fused()), h


def _randomize_affine(module, seed):
    """BatchNorm weights and biases away from 1 and 0, as in a trained network."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=gen) - 0.5)


def build_layer(case):
    """(Bench for case.impl, Bench for eager) of a single-op case, on the same weights and input."""
    device = torch.device(case.device)
    dtype, fmt = DTYPES[case.dtype], LAYOUTS[case.layout]
    torch.manual_seed(0)
    eager, impl_module, size = _layer_pair(case)
    if case.max_size:
        size = min(size, case.max_size)
    gen = torch.Generator().manual_seed(1)
    channels = case.shape[0]
    x = torch.randn(case.batch, channels, size, size, generator=gen)
    _randomize_affine(eager, 2)
    eager, x = eager.to(device), x.to(device)
    if any(isinstance(m, nn.BatchNorm2d) for m in eager.modules()):
        # Running statistics as a trained network's: batch statistics of inputs like x.
        calibrate_bn(eager, x)
    eager = eager.to(dtype=dtype, memory_format=fmt)
    x = x.to(dtype=dtype).contiguous(memory_format=fmt)
    if case.impl == "compile":
        torch._dynamo.reset()  # each shape compiles afresh, never hitting the recompile limit
        impl_module = torch.compile(eager, dynamic=False)
    elif impl_module is not eager:
        impl_module.load_state_dict(eager.state_dict())
        impl_module = impl_module.to(device=device, dtype=dtype, memory_format=fmt)
    train = case.mode == "train"
    for m in (eager, impl_module):
        m.train(train)
    with torch.no_grad():
        out_like = eager(x)
    grad = torch.randn(out_like.shape, generator=gen).to(device=device, dtype=dtype).contiguous(memory_format=fmt)
    nbytes = x.nbytes + out_like.nbytes
    if train:
        nbytes *= 2  # grad_out in, grad_x out
    return _module_bench(impl_module, x, grad, train, nbytes), _module_bench(eager, x, grad, train, nbytes)


def _module_bench(module, x, grad, train, nbytes):
    params = [p for p in module.parameters() if p.requires_grad]
    if not train:
        def run():
            with torch.no_grad():
                return module(x)
        return Bench(run, lambda: [run()], nbytes)
    xg = x.detach().requires_grad_()

    def run():
        xg.grad = None
        for p in params:
            p.grad = None
        out = module(xg)
        out.backward(grad)
        return out

    def outputs():
        out = run()
        return [out.detach(), xg.grad] + [p.grad for p in params]
    return Bench(run, outputs, nbytes)


@functools.lru_cache(maxsize=1)
def _calibrated_model(version, batch, size, device):
    """A float32 `version` on `device` with BN statistics calibrated on batch x size x size
    random images (at least 16: see effnet_fast.app.benchmark.bench_models); one kept, copied
    by each case."""
    from effnet_fast import EfficientNet
    torch.manual_seed(0)
    base = EfficientNet(version).to(device)
    return calibrate_bn(base, torch.empty(max(batch, 16), 3, size, size, device=device))


def build_model(case):
    """(Bench for case.impl, Bench for eager) of the whole model (case.shape: (version,)):
    eval forward or one SGD step."""
    device = torch.device(case.device)
    dtype, fmt = DTYPES[case.dtype], LAYOUTS[case.layout]
    size = model_size(case.shape[0])
    size = min(size, case.max_size) if case.max_size else size
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(case.batch, 3, size, size, generator=gen)
    y = torch.randint(0, 1000, (case.batch,), generator=gen).to(device)
    base = _calibrated_model(case.shape[0], case.batch, size, case.device)
    x = x.to(device=device, dtype=dtype).contiguous(memory_format=fmt)

    def variant(impl):
        import copy
        m = copy.deepcopy(base)
        if impl not in ("eager", "compile"):
            m.set_fused(impl)
        return m.to(device=device, dtype=dtype, memory_format=fmt)

    def bench(impl):
        model = variant(impl)
        run_model = None
        if impl == "compile":
            torch._dynamo.reset()
            run_model = torch.compile(model, dynamic=False)
        if case.mode == "eval":
            if impl not in ("eager", "compile"):
                model = freeze(model, impl)
            fn = (lambda: eval_forward(model, x, run_model))
            return Bench(fn, lambda: [fn()], None)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        fn = (lambda: train_step(model, opt, x, y, run_model))

        def outputs():
            torch.manual_seed(0)  # the same dropout and stochastic-depth draws for every candidate
            return [fn().detach()]
        return Bench(fn, outputs, None)
    eager = bench("eager")
    return (eager if case.impl == "eager" else bench(case.impl)), eager


def build(case):
    return build_model(case) if case.op == "model" else build_layer(case)


def max_rel_error(actual, expected):
    """Largest max |a - e| / max |e| over pairs of tensors (compared in float32)."""
    worst = 0.0
    for a, e in zip(actual, expected):
        if a is None or e is None:
            if a is not e:
                raise AssertionError("a gradient is missing")
            continue
        a, e = a.float(), e.float()
        if a.shape != e.shape:
            raise AssertionError(f"shape {tuple(a.shape)} differs from eager's {tuple(e.shape)}")
        if not torch.isfinite(a).all():
            raise AssertionError("non-finite values")
        scale = e.abs().max().clamp_min(1e-12)
        worst = max(worst, ((a - e).abs().max() / scale).item())
    return worst
