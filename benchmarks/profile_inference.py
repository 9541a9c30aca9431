"""Where B0's frozen eval forward spends its time, against ONNX Runtime's own profile
(BN statistics calibrated, channels_last, 224x224). Modes:

  ort N        ONNX Runtime's profiler (SessionOptions.enable_profiling), ms per op type, batch N
  convs N      each of the frozen model's convs timed alone on its recorded input, ms by kind
  onednn N B   oneDNN's own execution time of the frozen model's convs (mkldnn verbose), batch N,
               by implementation and kind; the model frozen in bfloat16 when B is 1
  ops N B      torch.profiler over one frozen forward (bfloat16 when B is 1): self time by op, the
               total, and the median wall time of a forward called directly
  se N B       B0's SE pool and scale shapes at batch N (bfloat16 when B is 1) against a copy of
               the same tensor (its memory floor)
  train N      torch.profiler over one fused training step (SGD, fused="cpu", channels_last)
  depthwise N B  oneDNN's depthwise conv + SiLU against the project's dwconv_bn_silu kernel, batch N,
               bfloat16 when B is 1
  dwtrain N B  the four depthwise conv + BN + SiLU training kernels (stats, forward, backward_reduce,
               backward) on B0's shapes at batch N against their memory floors, bfloat16 when B is 1
  overhead N S what the frozen model's convs cost per call: a forward at S x S (batch N) with and
               without them, and each conv called alone
  faults N     minor page faults per frozen forward, batch N

  OMP_NUM_THREADS=1 python benchmarks/profile_inference.py convs 1
"""
import collections
import json
import os
import resource
import sys
import tempfile
import time

import torch

from effnet_fast import EfficientNet, freeze
from effnet_fast.app.benchmark import calibrate_bn
from effnet_fast.nn.frozen import FrozenConv


def reference_model():
    torch.manual_seed(0)
    model = EfficientNet("b0")
    calibrate_bn(model, torch.randn(16, 3, 224, 224))
    return model.eval()


def frozen_model(bf16=0):
    return freeze(reference_model().set_fused("cpu").to(memory_format=torch.channels_last),
                  dtype=torch.bfloat16 if bf16 else None)


def median_ms(fn, repeats=20):
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[repeats // 2] * 1e3


def print_self_times(prof, rows=12):
    """ms of self CPU time by op, largest first, and their total."""
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    for e in events[:rows]:
        print(f"{e.key[:40]:<42}{e.self_cpu_time_total / 1e3:8.2f} ms  {e.count:5d} calls")
    print(f"{'total self time':<42}{sum(e.self_cpu_time_total for e in events) / 1e3:8.2f} ms")


def image(n):
    return torch.randn(n, 3, 224, 224).to(memory_format=torch.channels_last)


def mean_us(fn, repeats=20):
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e6


def ort(n, runs=8):
    import onnxruntime
    x = torch.randn(n, 3, 224, 224)
    path = os.path.join(tempfile.mkdtemp(), "b0.onnx")
    torch.onnx.export(reference_model(), (x,), path, dynamo=False, opset_version=17, input_names=["x"])
    opts = onnxruntime.SessionOptions()
    opts.intra_op_num_threads, opts.enable_profiling = torch.get_num_threads(), True
    opts.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "ort")
    session = onnxruntime.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        session.run(None, {"x": x.numpy()})
    with open(session.end_profiling()) as f:
        events = json.load(f)
    total, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            total[e["args"]["op_name"]] += e["dur"]
            count[e["args"]["op_name"]] += 1
    for op, us in total.most_common():
        print(f"{op:<24}{us / runs / 1e3:8.2f} ms  {count[op] // runs} nodes")
    print(f"{'total':<24}{sum(total.values()) / runs / 1e3:8.2f} ms")


def convs(n):
    model, x, calls = frozen_model(), image(n), []
    hooks = [m.register_forward_hook(lambda m, args, out: calls.append((m, args[0], args[1] if len(args) > 1 else None)))
             for m in model.modules() if isinstance(m, FrozenConv)]
    with torch.no_grad():
        model(x)
        for h in hooks:
            h.remove()
        ms, gflop = collections.Counter(), collections.Counter()
        for conv, inp, res in calls:
            kind = ("depthwise" if conv.groups > 1 else "1x1" if conv.kernel_size == (1, 1) else "stem") + \
                   (" + residual" if res is not None else "") + (" + SiLU" if conv.act else "")
            ms[kind] += mean_us(lambda: conv(inp, res)) / 1e3
            out = conv(inp, res)
            gflop[kind] += 2 * out.numel() * conv.weight[0].numel() / 1e9
    for kind in ms:
        print(f"{kind:<24}{ms[kind]:8.2f} ms  {gflop[kind]:.3f} GFLOP  {gflop[kind] / ms[kind] * 1e3:6.1f} GFLOP/s")
    print(f"{'total':<24}{sum(ms.values()):8.2f} ms")


def onednn(n, bf16=0):
    """oneDNN prints its verbose lines to the C stdout: read them from a child process."""
    import subprocess
    out = subprocess.run([sys.executable, __file__, "verbose", str(n), str(bf16)], capture_output=True, text=True,
                         check=True).stdout
    lines = [line.split(",") for line in out.splitlines() if line.startswith("onednn_verbose") and ",exec," in line]
    ms, count = collections.Counter(), collections.Counter()
    for f in lines:  # ..., implementation (f[6]), ..., problem description (f[-2]), ms (f[-1])
        kind = ("depthwise" if f[-2].startswith("g") else "matmul" if "matmul" in f[6] else
                "1x1" if "kh1" in f[-2] else "k x k")
        ms[(f[6], kind)] += float(f[-1])
        count[(f[6], kind)] += 1
    for (impl, kind), t in ms.most_common():
        print(f"{impl:<36}{kind:<11}{t:8.2f} ms  {count[(impl, kind)]} calls")
    print(f"{len(lines)} oneDNN primitives, {sum(float(f[-1]) for f in lines):.2f} ms of their own execution")


def ops(n, bf16=0):
    model, x = frozen_model(bf16), image(n)
    with torch.no_grad():
        wall = median_ms(lambda: model(x))
        with torch.profiler.profile() as prof:
            model(x)
    print_self_times(prof)
    print(f"median wall time of a forward called directly: {wall:.2f} ms")


def se(n, bf16=0):
    from effnet_fast.ops.backends import kernels
    k, dtype = kernels("cpu"), torch.bfloat16 if bf16 else torch.float32
    for c, hw in ((32, 112), (144, 56), (672, 14), (1152, 7)):
        x = torch.randn(n, c, hw, hw, dtype=dtype).to(memory_format=torch.channels_last)
        gate = torch.rand(n, c, dtype=dtype)
        mb = 2 * x.numel() * x.element_size() / 1e6  # x read and written; MB per ms is GB/s
        copy_ms, scale_ms, pool_ms = (median_ms(fn) for fn in (x.clone, lambda: k.se_scale(x, gate),
                                                                lambda: k.se_pool(x)))
        print(f"{n}x{c}x{hw}x{hw} {str(dtype)[6:]}: copy {copy_ms:.2f} ms ({mb / copy_ms:.1f} GB/s), se_scale "
              f"{scale_ms:.2f} ms ({mb / scale_ms:.1f} GB/s), se_pool {pool_ms:.2f} ms ({mb / 2 / pool_ms:.1f} GB/s read)")


def train(n):
    from effnet_fast.app.benchmark import train_step
    model = reference_model().set_fused("cpu").to(memory_format=torch.channels_last)
    x, y = image(n), torch.randint(0, 1000, (n,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for _ in range(2):
        train_step(model, opt, x, y)
    with torch.profiler.profile() as prof:
        train_step(model, opt, x, y)
    print_self_times(prof, rows=16)


def verbose(n, bf16=0):
    model, x = frozen_model(bf16), image(n)
    with torch.no_grad():
        model(x)
        with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
            model(x)


# B0's depthwise convs: (input size, channels, kernel, stride)
B0_DEPTHWISE = ((112, 32, 3, 1), (112, 96, 3, 2), (56, 144, 3, 1), (56, 144, 5, 2), (28, 240, 5, 1), (28, 240, 3, 2),
                (14, 480, 3, 1), (14, 480, 5, 1), (14, 672, 5, 1), (14, 672, 5, 2), (7, 1152, 5, 1), (7, 1152, 3, 1))


def depthwise(n=1, bf16=0):
    """B0's depthwise shapes at batch n (bf16=1: in bfloat16), oneDNN against ours."""
    from effnet_fast.ops.backends import kernels
    k, total_onednn, total_ours = kernels("cpu"), 0.0, 0.0
    dtype = torch.bfloat16 if bf16 else torch.float32
    for h, c, ks, s in B0_DEPTHWISE:
        x = torch.randn(n, c, h, h, dtype=dtype).to(memory_format=torch.channels_last)
        w, b, one = (t.to(dtype) for t in (torch.randn(c, 1, ks, ks), torch.randn(c), torch.ones(c)))
        p = ks // 2
        packed = torch._C._nn.mkldnn_reorder_conv2d_weight(w.to_mkldnn(), [p, p], [s, s], [1, 1], c, list(x.shape))
        onednn_us = mean_us(lambda: torch.ops.mkldnn._convolution_pointwise(x, packed, b, [p, p], [s, s], [1, 1], c,
                                                                             "swish", [], ""))
        ours_us = mean_us(lambda: k.dwconv_bn_silu_forward(x, w, one, b, s))
        total_onednn, total_ours = total_onednn + onednn_us, total_ours + ours_us
        print(f"{h}x{h}x{c} k{ks} s{s}: oneDNN {onednn_us:.0f} us, ours {ours_us:.0f} us")
    print(f"all 12 at batch {n}, {dtype}: oneDNN {total_onednn / 1e3:.2f} ms, ours {total_ours / 1e3:.2f} ms")


def dwtrain(n, bf16=0):
    """The four training kernels of the project's depthwise conv + BN + SiLU (channels_last) on
    B0's depthwise shapes at batch n, summed over the shapes, against each kernel's memory
    floor: the bytes it must read and write, at the speed of a copy of the same tensors."""
    from effnet_fast.ops.backends import kernels
    k, dtype = kernels("cpu"), torch.bfloat16 if bf16 else torch.float32
    ms, floor_ms = collections.Counter(), collections.Counter()
    for h, c, ks, s in B0_DEPTHWISE:
        x = torch.randn(n, c, h, h, dtype=dtype).to(memory_format=torch.channels_last)
        w = (torch.randn(c, 1, ks, ks) * 0.3).to(dtype)
        scale, shift, coef = torch.rand(c) + 0.5, torch.randn(c) * 0.1, [torch.randn(c) for _ in range(3)]
        mean, _ = k.dwconv_bn_silu_stats(x, w, s)
        out = k.dwconv_bn_silu_forward(x, w, scale, shift, s)
        g = torch.randn_like(out)
        copy_ms = (median_ms(x.clone) + median_ms(out.clone)) / 2  # a read and a write of each
        x_ms, out_ms = copy_ms * x.numel() / (x.numel() + out.numel()), copy_ms * out.numel() / (x.numel() + out.numel())
        kernels_ = {"stats": (lambda: k.dwconv_bn_silu_stats(x, w, s), x_ms / 2),  # reads x
                    "forward": (lambda: k.dwconv_bn_silu_forward(x, w, scale, shift, s), x_ms / 2 + out_ms / 2),
                    "backward_reduce": (lambda: k.dwconv_bn_silu_backward_reduce(g, x, w, scale, shift, mean, s),
                                        x_ms / 2 + out_ms / 2),  # reads x and grad_out
                    "backward": (lambda: k.dwconv_bn_silu_backward(g, x, w, scale, shift, *coef, s),
                                 x_ms + out_ms / 2)}  # reads x and grad_out, writes grad_x
        for name, (fn, floor) in kernels_.items():
            ms[name] += median_ms(fn, 9)
            floor_ms[name] += floor
    for name in ms:
        print(f"{name:<16}{ms[name]:8.2f} ms   memory floor {floor_ms[name]:6.2f} ms   {ms[name] / floor_ms[name]:5.1f}x")
    print(f"{'total':<16}{sum(ms.values()):8.2f} ms   memory floor {sum(floor_ms.values()):6.2f} ms   "
          f"({str(dtype)[6:]}, batch {n}, B0's 12 depthwise shapes, channels_last)")


def overhead(n, size):
    """The per-call cost of the frozen model's convolutions: a forward at a small input size
    (size x size, where the arithmetic is negligible) as it is and with every conv replaced
    by its recorded output, then each conv called alone on its recorded input, by kind."""
    model, x = frozen_model(), torch.randn(n, 3, size, size).to(memory_format=torch.channels_last)
    outputs, calls = {}, []
    real_forward = FrozenConv.forward

    def record(conv, inp, residual=None):
        out = real_forward(conv, inp, residual)
        outputs[id(conv)] = out
        calls.append((conv, inp, residual))
        return out

    with torch.no_grad():
        whole = median_ms(lambda: model(x), 50)
        try:
            FrozenConv.forward = record
            model(x)
            FrozenConv.forward = lambda conv, inp, residual=None: outputs[id(conv)]
            without = median_ms(lambda: model(x), 50)
        finally:
            FrozenConv.forward = real_forward
        alone = collections.defaultdict(list)
        for conv, inp, residual in calls:
            kind = ("depthwise" if conv.groups > 1 else "1x1" if conv.kernel_size == (1, 1) else "stem") + \
                   (" + residual" if residual is not None else "") + (" + SiLU" if conv.act else "")
            alone[kind].append(mean_us(lambda: conv(inp, residual), 200))
    print(f"batch {n}, {size}x{size}: forward {whole:.2f} ms; with the {len(calls)} convs replaced by their outputs "
          f"{without:.2f} ms")
    for kind, us in alone.items():
        print(f"  {kind:<22}{len(us):3d} calls, {sum(us) / len(us):6.1f} us a call alone")
    print(f"  sum of the convs alone: {sum(map(sum, alone.values())) / 1e3:.2f} ms")


def faults(n, repeats=5):
    model, x = frozen_model(), image(n)
    with torch.no_grad():
        for _ in range(2):
            model(x)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(repeats):
            model(x)
    print(f"{(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / repeats:.1f} minor page faults per forward")


if __name__ == "__main__":
    mode, *rest = sys.argv[1:] or ["convs"]
    modes = {"ort": ort, "convs": convs, "onednn": onednn, "verbose": verbose, "ops": ops, "se": se, "train": train,
             "depthwise": depthwise, "dwtrain": dwtrain, "overhead": overhead,
             "faults": faults}
    modes[mode](*map(int, rest))
