"""GPU benchmark: fused depthwise conv + BatchNorm + SiLU at EfficientNet-B0's depthwise
shapes, and the whole B0 training step.

Per layer (batch 128 by default), dtype and layout, training mode:
  eager    cuDNN conv + BatchNorm + SiLU modules
  compile  torch.compile of the same modules
  triton   fused op, backend "triton"
  cuda     fused op, backend "cuda" (when the CUDA extension is built)
for the forward and for forward + backward, in milliseconds, next to the memory floor:
bytes that must move (forward: x in, out; forward + backward: also grad_out in, x in
again, grad_x out) over the device-to-device copy bandwidth measured first. Each fused
row is also checked against eager (max relative error of output and grad_x).
Then the B0 training step (SGD, 224x224) for fused=False / "triton" / "cuda": img/s and
peak memory.

Rows run in priority order within --budget-s seconds; the rest are marked skipped.
One failing row never stops the others.

  python benchmarks/gpu_bench.py [--batch 128] [--budget-s 150] [--json out.json]
  TRITON_INTERPRET=1 python benchmarks/gpu_bench.py --device cpu --batch 2 --layers 0 --no-model
      (smoke test of the script itself without a GPU; the times mean nothing)
"""
import argparse
import json
import sys
import time
import traceback

B0_DEPTHWISE = [(32, 112, 3, 1), (96, 112, 3, 2), (144, 56, 3, 1), (144, 56, 5, 2), (240, 28, 5, 1),
                (240, 28, 3, 2), (480, 14, 3, 1), (480, 14, 5, 1), (672, 14, 5, 1), (672, 14, 5, 2),
                (1152, 7, 5, 1), (1152, 7, 3, 1)]
# (dtype, layout) passes in priority order.
PASSES = [("fp32", "nchw"), ("bf16", "cl"), ("bf16", "nchw"), ("fp32", "cl")]
DEVICE = "cuda"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--passes", default=",".join(f"{d}-{l}" for d, l in PASSES),
                   help="dtype-layout passes in order (dtype fp32|bf16|fp16, layout nchw|cl)")
    p.add_argument("--layers", default="all", help="indices into the 12 B0 layers, e.g. 0,3,10, or all")
    p.add_argument("--budget-s", type=float, default=150.0, help="stop starting rows after this many seconds")
    p.add_argument("--compile-budget-s", type=float, default=40.0,
                   help="seconds of the budget torch.compile rows may use (0 disables them)")
    p.add_argument("--model-batch", type=int, default=128)
    p.add_argument("--model-steps", type=int, default=8)
    p.add_argument("--no-model", action="store_true", help="skip the whole-model training step")
    p.add_argument("--json", help="also write all measurements to this file")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: smoke test only")
    return p.parse_args(argv)


class Budget:
    def __init__(self, seconds, compile_seconds):
        self.start, self.seconds = time.time(), seconds
        self.compile_left = compile_seconds

    def left(self):
        return self.seconds - (time.time() - self.start)


def bench_ms(fn, grad_to_none=None):
    """Median milliseconds of fn() (L2 flushed between runs)."""
    if DEVICE == "cpu":
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return sorted(times)[1]
    import triton.testing
    return triton.testing.do_bench(fn, warmup=10, rep=40, grad_to_none=grad_to_none, return_mode="median")


def copy_bandwidth(torch):
    """Device-to-device copy bandwidth in bytes/s (read + write) over a 1 GiB buffer."""
    src = torch.empty(2 ** 28 if DEVICE == "cuda" else 2 ** 22, dtype=torch.float32, device=DEVICE).normal_()
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (ms * 1e-3)


def _layer_modules(torch, c, k, s, dtype, memory_format, backends):
    from effnet_fast.layers import DWConvBNSiLU, FusedDWConvBNSiLU
    torch.manual_seed(0)
    eager = DWConvBNSiLU(c, k, s).to(DEVICE)
    with torch.no_grad():
        eager.conv.weight.normal_(0, 0.3)
    mods = {"eager": eager}
    for name in backends:
        fused = FusedDWConvBNSiLU(c, k, s, backend=name).to(DEVICE)
        fused.load_state_dict(eager.state_dict())
        mods[name] = fused
    return {name: m.to(dtype=dtype, memory_format=memory_format).train() for name, m in mods.items()}


def _time_module(torch, mod, x, grad):
    with torch.no_grad():
        fwd = bench_ms(lambda: mod(x))
    xg = x.detach().clone().requires_grad_()
    params = [p for p in mod.parameters()]
    fb = bench_ms(lambda: mod(xg).backward(grad), grad_to_none=[xg] + params)
    return fwd, fb


def _max_rel_err(torch, mod, ref, x, grad):
    """max |a - b| / max |b| over the output and grad_x of mod vs ref."""
    errs = []
    outs = []
    for m in (mod, ref):
        xg = x.detach().clone().requires_grad_()
        out = m(xg)
        out.backward(grad)
        outs.append((out.float(), xg.grad.float()))
    for a, b in zip(*outs):
        errs.append(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item())
    return max(errs)


def bench_layer(torch, layer, dtype_name, layout, batch, bw, budget, backends):
    c, h, k, s = layer
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    memory_format = torch.channels_last if layout == "cl" else torch.contiguous_format
    mods = _layer_modules(torch, c, k, s, dtype, memory_format, backends)
    x = torch.randn(batch, c, h, h, device=DEVICE, dtype=dtype).contiguous(memory_format=memory_format)
    with torch.no_grad():
        out = mods["eager"](x)
    grad = torch.randn_like(out)
    row = {"layer": f"{c}x{h} k{k}s{s}", "dtype": dtype_name, "layout": layout}
    size = x.element_size()
    floor_fwd = (x.numel() + out.numel()) * size / bw * 1e3
    floor_fb = floor_fwd + (out.numel() + 2 * x.numel()) * size / bw * 1e3
    row["floor"] = (floor_fwd, floor_fb)
    for name, mod in mods.items():
        try:
            row[name] = _time_module(torch, mod, x, grad)
            if name != "eager":
                row[f"{name}_err"] = _max_rel_err(torch, mod, mods["eager"], x, grad)
        except Exception as exc:  # one backend failing must not hide the others
            row[name] = f"{type(exc).__name__}: {exc}"[:200]
    if budget.compile_left > 0:
        t0 = time.time()
        try:
            torch._dynamo.reset()
            compiled = torch.compile(mods["eager"])
            with torch.no_grad():
                compiled(x)
            compiled(x.detach().clone().requires_grad_()).backward(grad)
            row["compile"] = _time_module(torch, compiled, x, grad)
        except Exception as exc:
            row["compile"] = f"{type(exc).__name__}: {exc}"[:200]
        budget.compile_left -= time.time() - t0
    return row


def bench_model(torch, fused, batch, steps):
    from effnet_fast import EfficientNet
    torch.manual_seed(0)
    model = EfficientNet("b0", fused=fused).cuda()
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    y = torch.randint(0, 1000, (batch,), device="cuda")
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(3):  # compiles and autotunes the kernels
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        step()
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / steps
    return {"model": f"fused={fused!r}", "layout": "nchw", "step_ms": ms,
            "img_s": batch / (ms * 1e-3), "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30}


def _cell(v, width=7):
    if isinstance(v, float):
        return f"{v:>{width}.3f}"
    return f"{'-' if v is None else 'ERR':>{width}}"


def layer_header(names):
    cols = " ".join(f"{n[:7]:>7}" for n in ["eager", "compile"] + names) + f" {'floor':>7}"
    ratios = " ".join(f"{n[:6] + '/fl':>9}" for n in names)
    print(f"\n(ms; <backend>/fl: fused forward+backward time over its memory floor; ERR: message below the row)\n"
          f"{'layer':<14}{'dt':<5}{'lay':<5}| fwd: {cols} | fwd+bwd: {cols} | {ratios} | max rel err", flush=True)


def print_layer_row(r, names):
    lead = f"{r['layer']:<14}{r['dtype']:<5}{r['layout']:<5}|"
    if "skipped" in r:
        print(f"{lead} skipped ({r['skipped']})", flush=True)
        return
    cols = ["eager", "compile"] + names
    parts = []
    for i in (0, 1):
        cells = [_cell(r[c][i] if isinstance(r.get(c), tuple) else r.get(c)) for c in cols]
        parts.append(" ".join(cells) + " " + _cell(r["floor"][i]))
    ratios = " ".join(f"{r[n][1] / r['floor'][1]:>9.2f}" if isinstance(r.get(n), tuple) else f"{'-':>9}"
                      for n in names)
    errs = " ".join(f"{n}={r[n + '_err']:.1e}" for n in names if isinstance(r.get(n + "_err"), float))
    print(f"{lead} fwd: {parts[0]} | fwd+bwd: {parts[1]} | {ratios} | {errs}", flush=True)
    for c in cols:
        if isinstance(r.get(c), str):
            print(f"    {c}: {r[c]}", flush=True)


def model_header():
    print(f"\n{'B0 train step':<22}{'layout':<7}{'ms/step':>9}{'img/s':>9}{'peak GiB':>10}", flush=True)


def print_model_row(r):
    if "error" in r or "skipped" in r:
        print(f"{r['model']:<22}{r['layout']:<7} {r.get('error') or 'skipped (' + r['skipped'] + ')'}", flush=True)
    else:
        print(f"{r['model']:<22}{r['layout']:<7}{r['step_ms']:>9.1f}{r['img_s']:>9.0f}{r['peak_gib']:>10.2f}",
              flush=True)


def run_models(torch, args, backends, budget):
    """B0 training step rows, printed as they finish."""
    rows = []
    model_header()
    for fused in [False] + backends:
        if budget.left() <= 0:
            row = {"model": f"fused={fused!r}", "layout": "nchw", "skipped": "budget"}
        else:
            try:
                row = bench_model(torch, fused, args.model_batch, args.model_steps)
            except Exception as exc:
                traceback.print_exc()
                row = {"model": f"fused={fused!r}", "layout": "nchw", "error": f"{type(exc).__name__}: {exc}"[:200]}
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        print_model_row(row)
    return rows


def run_layers(torch, args, backends, budget, bw):
    """Per-layer rows, pass by pass, printed as they finish."""
    rows = []
    layers = B0_DEPTHWISE if args.layers == "all" else [B0_DEPTHWISE[int(i)] for i in args.layers.split(",")]
    layer_header(backends)
    for pass_ in args.passes.split(","):
        dtype_name, layout = pass_.split("-")
        for c, h, k, s in layers:
            row = {"layer": f"{c}x{h} k{k}s{s}", "dtype": dtype_name, "layout": layout}
            if budget.left() <= 0:
                row["skipped"] = "budget"
            else:
                try:
                    row = bench_layer(torch, (c, h, k, s), dtype_name, layout, args.batch, bw, budget, backends)
                except Exception as exc:
                    traceback.print_exc()
                    row["skipped"] = f"{type(exc).__name__}: {exc}"[:200]
                if DEVICE == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
            print_layer_row(row, backends)
    return rows


def main(argv=None):
    global DEVICE
    args = parse_args(argv)
    DEVICE = args.device
    import torch
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("gpu_bench: no CUDA device (--device cpu runs a smoke test)", file=sys.stderr)
        return 2
    from effnet_fast.ops.backends import _why_unusable
    backends = [name for name in ("triton", "cuda") if _why_unusable(name, torch.device(DEVICE)) is None]
    budget = Budget(args.budget_s, args.compile_budget_s)
    torch.backends.cudnn.benchmark = True
    bw = copy_bandwidth(torch)
    device_name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    print(f"{device_name}, torch {torch.__version__}, fused backends {backends}, "
          f"copy bandwidth {bw / 1e9:.0f} GB/s, batch {args.batch}", flush=True)
    results = {"device": device_name, "bandwidth_gbs": bw / 1e9}
    results["model"] = [] if args.no_model else run_models(torch, args, backends, budget)
    results["layers"] = run_layers(torch, args, backends, budget, bw)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
