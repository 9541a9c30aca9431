"""Whole EfficientNet against what a user would run instead, measured in one run: the
candidates take turns, each row is the median of its turns, and every candidate's
output is checked against eager PyTorch before timing.

Eval rows (on copies of one model whose BN statistics are calibrated as in a trained
model; see effnet_fast.app.benchmark.calibrate_bn): eager NCHW and channels_last, fused
channels_last (the fused ops, from the current parameters), the frozen model
(effnet_fast.freeze: BN folded once), and optionally torch.compile (default and with freezing),
ONNX Runtime and OpenVINO on the exported reference model. Training rows (SGD step,
cross-entropy, separate copies): eager NCHW and channels_last, fused, torch.compile.

  python benchmarks/bench_model.py [--version b0] [--batch 16] [--size N] [--compile] [--onnx] [--peers]
  python benchmarks/bench_model.py --profile          (where the frozen model's forward spends its time)
"""
import argparse
import copy
import os
import sys
import tempfile

import torch

from effnet_fast import EfficientNet, freeze
from effnet_fast.app.benchmark import calibrate_bn, eval_forward, median, times_in_turns, train_step


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


def onnx_runner(model, x, engine):
    """A callable running the exported reference model in ONNX Runtime or OpenVINO with
    torch's thread count, or (None, reason)."""
    threads = torch.get_num_threads()
    path = os.path.join(tempfile.mkdtemp(), "model.onnx")
    try:
        if engine == "onnxruntime":
            import onnxruntime as ort
        else:
            import openvino as ov
    except ImportError as exc:
        return None, f"not installed ({exc})"
    torch.onnx.export(model.eval(), (x.contiguous(),), path, dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"])
    if engine == "onnxruntime":
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        return (lambda a: torch.from_numpy(session.run(None, {"x": a.contiguous().numpy()})[0])), \
            f"onnxruntime {ort.__version__}, {threads} intra-op threads"
    core = ov.Core()
    net = core.compile_model(path, "CPU", {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"})
    request = net.create_infer_request()
    return (lambda a: torch.from_numpy(request.infer({0: a.contiguous().numpy()})[0].copy())), \
        f"openvino {ov.__version__}, {threads} threads, f32"


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
                import timm
                model = timm.create_model(f"efficientnet_{base.version}")
        except (ImportError, AttributeError, RuntimeError) as exc:
            print(f"  {peer}: skipped ({exc})")
            continue
        model.load_state_dict(to_layout(base, peer))
        model = model.to(memory_format=torch.channels_last)
        patched = copy.deepcopy(model)
        patch(patched)
        out += [(f"{peer} channels_last", model), (f"{peer} patched", patched)]
    return out


def eval_candidates(args, base, x_nchw, x_cl):
    """[(label, fn)] for the eval rows; each fn runs one no-grad forward."""
    rows = [("eager NCHW", variant(base, False, False), x_nchw),
            ("eager channels_last", variant(base, False, True), x_cl),
            (f"fused={args.fused} channels_last", variant(base, args.fused, True), x_cl),
            ("frozen channels_last", freeze(variant(base, args.fused, True)), x_cl)]
    if args.peers:
        for label, m in peer_models(base):
            rows.append((label, m, x_cl))
            if label.endswith("patched"):
                rows.append((label.replace("patched", "frozen"), freeze(m), x_cl))
    out = [(label, (lambda m=m, x=x: eval_forward(m, x))) for label, m, x in rows]
    if args.compile:
        for label, freezing in (("torch.compile", False), ("torch.compile, freezing", True)):
            out.append((label, compiled_eval(variant(base, False, True).eval(), x_cl, freezing)))
    if args.onnx:
        for engine in ("onnxruntime", "openvino"):
            run, info = onnx_runner(copy.deepcopy(base), x_nchw, engine)
            if run is None:
                print(f"  {engine}: skipped, {info}")
                continue
            print(f"  {engine}: {info}")
            out.append((engine, (lambda run=run: run(x_nchw))))
    return out


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
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=None, help="input size (default: the variant's resolution)")
    p.add_argument("--fused", default="cpu")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--compile", action="store_true", help="add torch.compile rows (compiles for minutes on a CPU)")
    p.add_argument("--onnx", action="store_true", help="add ONNX Runtime and OpenVINO eval rows (when installed)")
    p.add_argument("--peers", action="store_true",
                   help="add torchvision's and timm's model, unpatched and with effnet_fast.patch (when installed)")
    p.add_argument("--no-train", action="store_true", help="eval rows only")
    p.add_argument("--profile", action="store_true", help="only profile one eval forward of the fused model")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    base = EfficientNet(args.version)
    size = args.size or base.resolution
    x_nchw, y = inputs(args.batch, size, False)
    x_cl = x_nchw.to(memory_format=torch.channels_last)
    calibrate_bn(base, x_nchw)
    if args.profile:
        return profile_eval(freeze(variant(base, args.fused, True)), x_cl)
    print(f"{args.version}, batch {args.batch}, {size}x{size}, float32, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, median of {args.repeats} in turns")

    evals = eval_candidates(args, base, x_nchw, x_cl)
    expected = eval_forward(variant(base, False, False), x_nchw)
    print(f"  eager output: mean |y| {expected.abs().mean():.3g}, max |y| {expected.abs().max():.3g}")
    diffs = []
    for label, fn in evals:
        fn()  # warm-up (and compilation)
        diffs.append((fn() - expected).abs().max().item())
        print(f"  ready: {label}", file=sys.stderr)
    times = in_turns([fn for _, fn in evals], args.repeats)
    print(f"\n{'eval forward':<32}{'ms':>9}{'x eager NCHW':>14}{'x eager CL':>12}{'max |diff|':>12}")
    for (label, _), t, d in zip(evals, times, diffs):
        print(f"{label:<32}{t * 1e3:>9.1f}{times[0] / t:>14.2f}{times[1] / t:>12.2f}{d:>12.2e}")

    if args.no_train:
        return
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


def profile_eval(model, x):
    """Where the frozen model's forward spends its time (channels_last), by op."""
    eval_forward(model, x)
    with torch.profiler.profile() as prof:
        eval_forward(model, x)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
