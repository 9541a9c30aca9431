"""Whole EfficientNet against what a user would run instead, measured in one run: the
candidates take turns, each row is the median of its turns, and every candidate's
output is checked against eager PyTorch before timing.

Eval rows (on copies of one model whose BN statistics are calibrated as in a trained
model; see effnet_fast.app.benchmark.calibrate_bn): eager NCHW and channels_last, fused
channels_last (the fused ops, from the current parameters), the frozen model
(effnet_fast.freeze: BN folded once), and optionally torch.compile (default and with freezing),
ONNX Runtime and OpenVINO on the exported reference model. bfloat16 eval rows: eager
and fused under bf16 autocast, the frozen model under autocast and frozen with
dtype=bfloat16, OpenVINO with its bf16 precision hint; each checked against eager
float32 (relative max diff and top-1 agreement printed). Training rows (SGD step,
cross-entropy, separate copies): eager NCHW and channels_last, fused, torch.compile.

  python benchmarks/bench_model.py [--version b0|v2_s|...] [--batch 1 16] [--size N] [--dtype float32 bfloat16]
                                   [--compile] [--onnx] [--peers] [--no-train] [--chart out.png]
  python benchmarks/bench_model.py --profile          (where the frozen model's forward spends its time)
"""
import argparse
import copy
import os
import sys
import tempfile

import torch

from effnet_fast import EfficientNet, freeze
from effnet_fast.app.benchmark import (calibrate_bn, eval_forward, median, relative_error, times_in_turns,
                                       train_step)


def inputs(batch, size, channels_last, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=g)
    y = torch.randint(0, 1000, (batch,), generator=g)
    return (x.to(memory_format=torch.channels_last) if channels_last else x), y


def saved_bytes(model, x):
    """Bytes kept for backward by one training forward, each storage counted once."""
    seen = {}

    def pack(t):
        if t.device.type != "meta" and t.untyped_storage().nbytes():
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    seen.pop(x.untyped_storage().data_ptr(), None)  # the input exists anyway
    del out
    return sum(seen.values())


def variant(base, fused, channels_last):
    model = copy.deepcopy(base).set_fused(fused)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def compiled_eval(model, x, freezing):
    """A no-grad forward of torch.compile(model), compiled (now, by a first call) with
    inductor's freezing (BN folding, prepacked weights) on or off."""
    import torch._inductor.config as inductor_config
    run = torch.compile(model)
    with inductor_config.patch(freezing=freezing):
        eval_forward(model, x, run)
    return lambda: eval_forward(model, x, run)


def onnx_runners(model, x, engines):
    """[(label, dtype, callable)] running the exported reference model in each installed
    engine of `engines` ("onnxruntime", "openvino", "openvino bf16") with torch's
    thread count; prints the engines skipped and why."""
    threads = torch.get_num_threads()
    path = os.path.join(tempfile.mkdtemp(), "model.onnx")
    torch.onnx.export(model.eval(), (x.contiguous(),), path, dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"])
    out = []
    for engine in engines:
        try:
            run, info = _engine(engine, path, threads)
        except ImportError as exc:
            print(f"  {engine}: skipped, not installed ({exc})")
            continue
        print(f"  {engine}: {info}")
        out.append((engine, "bfloat16" if engine.endswith("bf16") else "float32", run))
    return out


def _engine(engine, path, threads):
    if engine == "onnxruntime":
        import onnxruntime as ort
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        return (lambda a: torch.from_numpy(session.run(None, {"x": a.contiguous().numpy()})[0])), \
            f"onnxruntime {ort.__version__}, {threads} intra-op threads"
    import openvino as ov
    precision = "bf16" if engine.endswith("bf16") else "f32"
    net = ov.Core().compile_model(path, "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                "INFERENCE_PRECISION_HINT": precision})
    request = net.create_infer_request()
    return (lambda a: torch.from_numpy(request.infer({0: a.contiguous().numpy()})[0].copy())), \
        f"openvino {ov.__version__}, {threads} threads, INFERENCE_PRECISION_HINT {precision}"


def peer_models(base):
    """[(label, module)]: torchvision's and timm's build of the same variant with base's
    weights, unpatched and patched (effnet_fast.patch), channels_last; those installed."""
    from effnet_fast import patch
    from effnet_fast.convert import to_layout
    out = []
    for peer in ("torchvision", "timm"):
        try:
            if peer == "torchvision":
                import torchvision
                model = getattr(torchvision.models, f"efficientnet_{base.version}")()
            else:
                import timm  # its V2 is efficientnetv2_s (eps 1e-5 by default: given ours)
                v2 = base.version.startswith("v2")
                model = timm.create_model(f"efficientnet{base.version}" if v2 else f"efficientnet_{base.version}",
                                          bn_eps=base.stem.bn.eps)
        except (ImportError, AttributeError, RuntimeError) as exc:
            print(f"  {peer}: skipped ({exc})")
            continue
        model.load_state_dict(to_layout(base, peer))
        model = model.to(memory_format=torch.channels_last)
        patched = copy.deepcopy(model)
        patch(patched)
        out += [(f"{peer} channels_last", model), (f"{peer} patched", patched)]
    return out


def autocast_forward(model, x, dtype=torch.bfloat16):
    return eval_forward(model, x, amp=dtype)


def eval_candidates(args, base, x_nchw, x_cl):
    """[(label, dtype name, fn)] for the eval rows; each fn runs one no-grad forward."""
    fused = variant(base, args.fused, True)
    out = []
    if "float32" in args.dtype:
        rows = [("eager NCHW", variant(base, False, False), x_nchw),
                ("eager channels_last", variant(base, False, True), x_cl),
                (f"fused={args.fused} channels_last", fused, x_cl),
                ("frozen channels_last", freeze(fused), x_cl)]
        if args.peers:
            for label, m in peer_models(base):
                rows.append((label, m, x_cl))
                if label.endswith("patched"):
                    rows.append((label.replace("patched", "frozen"), freeze(m), x_cl))
        out += [(label, "float32", (lambda m=m, x=x: eval_forward(m, x))) for label, m, x in rows]
        if args.compile:
            for label, freezing in (("torch.compile", False), ("torch.compile, freezing", True)):
                out.append((label, "float32", compiled_eval(variant(base, False, True).eval(), x_cl, freezing)))
    if "bfloat16" in args.dtype:
        eager, frozen = variant(base, False, True), freeze(fused)
        out += [("eager bf16 autocast", "bfloat16", lambda: autocast_forward(eager, x_cl)),
                (f"fused={args.fused} bf16 autocast", "bfloat16", lambda: autocast_forward(fused, x_cl)),
                ("frozen, bf16 autocast", "bfloat16", lambda: autocast_forward(frozen, x_cl))]
        frozen_bf16 = freeze(fused, dtype=torch.bfloat16)
        out.append(("frozen, dtype=bfloat16", "bfloat16", lambda: eval_forward(frozen_bf16, x_cl)))
    if args.onnx:
        engines = [e for e, dtype in (("onnxruntime", "float32"), ("openvino", "float32"),
                                      ("openvino bf16", "bfloat16")) if dtype in args.dtype]
        out += [(label, dtype, (lambda run=run: run(x_nchw)))
                for label, dtype, run in onnx_runners(copy.deepcopy(base), x_nchw, engines)]
    return out


def agreement(actual, expected):
    """(max |actual - expected| / max |expected|, fraction of equal top-1 classes)."""
    return relative_error(actual, expected), (actual.argmax(1) == expected.argmax(1)).float().mean().item()


# Largest max |diff| / max |eager float32| accepted before timing a candidate.
TOLERANCE = {"float32": 1e-3, "bfloat16": 0.1}
# A bfloat16 row closer than this to float32 ran in float32 (its label would be wrong).
LOW_PRECISION_MIN_DIFF = 1e-4


def train_candidates(args, base, x_nchw, x_cl, y):
    out = []
    configs = [("eager NCHW", False, False), ("eager channels_last", False, True),
               (f"fused={args.fused} channels_last", args.fused, True)]
    for label, fused, cl in configs:
        m = variant(base, fused, cl)
        opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
        x = x_cl if cl else x_nchw
        out.append((label, (lambda m=m, opt=opt, x=x: train_step(m, opt, x, y)), saved_bytes(m, x)))
    for label, m in peer_models(base) if args.peers else []:
        opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
        out.append((label, (lambda m=m, opt=opt: train_step(m, opt, x_cl, y)), saved_bytes(m, x_cl)))
    if args.compile:
        m = variant(base, False, True)
        opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
        run = torch.compile(m)
        out.append(("torch.compile", (lambda: train_step(m, opt, x_cl, y, run)), float("nan")))
    return out


def in_turns(fns, repeats):
    """Median seconds of each fn, the fns taking turns (warmed up by the caller)."""
    return [median(ts) for ts in times_in_turns(fns, repeats, warmup=0)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", default="b0")
    p.add_argument("--batch", type=int, nargs="+", default=[16], help="batch sizes, each a table of its own")
    p.add_argument("--size", type=int, default=None, help="input size (default: the variant's resolution)")
    p.add_argument("--fused", default="cpu")
    p.add_argument("--dtype", nargs="+", choices=("float32", "bfloat16"), default=["float32", "bfloat16"],
                   help="eval rows in these dtypes (bfloat16: autocast, a bfloat16 frozen model, OpenVINO's bf16 "
                        "precision hint)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--compile", action="store_true", help="add torch.compile rows (compiles for minutes on a CPU)")
    p.add_argument("--onnx", action="store_true", help="add ONNX Runtime and OpenVINO eval rows (when installed)")
    p.add_argument("--peers", action="store_true",
                   help="add torchvision's and timm's model, unpatched and with effnet_fast.patch (when installed)")
    p.add_argument("--no-train", action="store_true", help="eval rows only")
    p.add_argument("--chart", metavar="PNG", help="also draw the eval rows as bars (matplotlib) into this file")
    p.add_argument("--profile", action="store_true", help="only profile one eval forward of the frozen model")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    base = EfficientNet(args.version)
    size = args.size or base.resolution
    calibrate_bn(base, inputs(16, size, False)[0])
    if args.profile:
        x_cl = inputs(args.batch[0], size, True)[0]
        return profile_eval(freeze(variant(base, args.fused, True)), x_cl)
    tables = {}
    for batch in args.batch:
        x_nchw, y = inputs(batch, size, False)
        x_cl = x_nchw.to(memory_format=torch.channels_last)
        print(f"\n{args.version}, batch {batch}, {size}x{size}, {torch.get_num_threads()} threads, "
              f"torch {torch.__version__}, median of {args.repeats} in turns")
        tables[batch] = eval_table(args, base, x_nchw, x_cl)
        if not args.no_train:
            train_table(args, base, x_nchw, x_cl, y)
    if args.chart:
        draw_chart(tables, args, size)


def eval_table(args, base, x_nchw, x_cl):
    """Times the eval candidates in turns, each checked against eager float32 first;
    prints the table and returns [(label, dtype, seconds)]."""
    evals = eval_candidates(args, base, x_nchw, x_cl)
    expected = eval_forward(variant(base, False, False), x_nchw).float()
    print(f"  eager float32 output: mean |y| {expected.abs().mean():.3g}, max |y| {expected.abs().max():.3g}")
    checks = []
    for label, dtype, fn in evals:
        fn()  # warm-up (and compilation)
        rel, top1 = agreement(fn(), expected)
        if rel > TOLERANCE[dtype]:
            raise AssertionError(f"{label}: output differs from eager float32 by {rel:.3g} of its largest value "
                                 f"(accepted for {dtype}: {TOLERANCE[dtype]})")
        if dtype != "float32" and rel < LOW_PRECISION_MIN_DIFF:
            raise AssertionError(f"{label}: output equals eager float32 to {rel:.3g}: it did not compute in {dtype}")
        checks.append((rel, top1))
        print(f"  ready: {label}", file=sys.stderr)
    times = in_turns([fn for _, _, fn in evals], args.repeats)
    eager = {dtype: t for (label, dtype, _), t in zip(evals, times) if label.startswith("eager") and "NCHW" not in label}
    print(f"\n{'eval forward':<32}{'dtype':>9}{'ms':>9}{'x eager CL':>12}{'x eager, dtype':>16}{'rel diff':>10}"
          f"{'top-1 agree':>13}")
    for (label, dtype, _), t, (rel, top1) in zip(evals, times, checks):
        same = eager.get(dtype, float("nan")) / t
        print(f"{label:<32}{dtype:>9}{t * 1e3:>9.1f}{eager.get('float32', float('nan')) / t:>12.2f}{same:>16.2f}"
              f"{rel:>10.1e}{top1 * 100:>12.1f}%")
    return [(label, dtype, t) for (label, dtype, _), t in zip(evals, times)]


def train_table(args, base, x_nchw, x_cl, y):
    trains = train_candidates(args, base, x_nchw, x_cl, y)
    losses = []
    for label, fn, _ in trains:
        losses.append(fn().item())  # first step from the same weights: the losses must agree
        fn()
        print(f"  ready: {label}", file=sys.stderr)
    times = in_turns([fn for _, fn, _ in trains], args.repeats)
    base_bytes = trains[0][2]
    print(f"\n{'training step':<32}{'ms':>9}{'x eager NCHW':>14}{'x eager CL':>12}{'first loss':>12}"
          f"{'saved MiB':>11}{'vs eager':>10}")
    for (label, _, nbytes), t, loss in zip(trains, times, losses):
        print(f"{label:<32}{t * 1e3:>9.1f}{times[0] / t:>14.2f}{times[1] / t:>12.2f}{loss:>12.5f}"
              f"{nbytes / 2**20:>11.1f}{(nbytes / base_bytes - 1) * 100:>9.1f}%")


def draw_chart(tables, args, size):
    """One horizontal bar chart per batch size: ms per forward of each eval candidate,
    float32 and bfloat16 in two colours, ours marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(tables), figsize=(6.5 * len(tables), 0.32 * max(map(len, tables.values())) + 1.6),
                             squeeze=False)
    colours = {"float32": "#4c72b0", "bfloat16": "#dd8452"}
    for ax, (batch, rows) in zip(axes[0], tables.items()):
        labels = [f"{label} ({'fp32' if dtype == 'float32' else 'bf16'})" for label, dtype, _ in rows]
        ms = [t * 1e3 for _, _, t in rows]
        bars = ax.barh(range(len(rows)), ms, color=[colours[d] for _, d, _ in rows])
        for bar, (label, _, _) in zip(bars, rows):
            if label.startswith(("frozen", "fused")):
                bar.set_hatch("//")
        ax.set_yticks(range(len(rows)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
        ax.set_xlabel("ms per forward (lower is better)")
        ax.set_title(f"{args.version}, batch {batch}, {size}x{size}, {torch.get_num_threads()} threads", fontsize=9)
    fig.suptitle("Eval forward on the CPU; hatched: effnet_fast", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.chart, dpi=110)
    print(f"chart: {args.chart}")


def profile_eval(model, x):
    """Where the frozen model's forward spends its time (channels_last), by op."""
    eval_forward(model, x)
    with torch.profiler.profile() as prof:
        eval_forward(model, x)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
