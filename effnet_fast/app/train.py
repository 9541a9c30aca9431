"""`effnet-fast train`: image classification training, on one process or several
(`torchrun --nproc-per-node N -m effnet_fast train ...`).

Data: scikit-learn's digits (built in, the default), an ImageFolder directory or
CIFAR-10 in its python format (see data.py). The options are in train_config.py, the
loop's pieces in train_loop.py, the checkpoint format in checkpoint.py. Optimiser SGD (Nesterov) or AdamW with a
cosine schedule after a linear warmup, label smoothing, no weight decay on BatchNorm
and biases, bf16 / fp16 autocast, channels_last, an EMA of the weights. A checkpoint
(atomic, loadable with `torch.load(..., weights_only=True)`) is written after every
epoch and on SIGINT / SIGTERM; `--resume` continues it: the data order is a function
of (seed, epoch) and the RNG states are saved, so a resumed run repeats the losses of
an uninterrupted one. Metrics go to a JSON-lines log and, at the end, a PNG plot
beside the checkpoint."""
import functools
import json
import os
import random
import time
from dataclasses import dataclass, field

import torch

from .args import FUSED_NAMES, describe_backend
from .checkpoint import check_writable, output_paths, save_atomic, serving_model, training_checkpoint
from .data import EpochSampler, UnreadableImage, make_loader
from .runtime import Distributed, Progress, StopRequest, rng_state, set_rng_state
from .train_config import DEFAULT_OUT, OPTION_NAMES, add_parser, load_inputs, parse_train_args, plain_args
from .train_loop import (AMP_DTYPES, Ema, TrainParts, calibrate_batch_norm, evaluate, lr_factor, make_model,
                         param_groups, place_model, train_one_epoch, zero_init)


def add_command(sub):
    """The `train` subcommand of the command line."""
    p = add_parser(sub)
    p.set_defaults(func=run_command)
    return p


def run_command(args, inputs):
    if args.out == DEFAULT_OUT and int(os.environ.get("RANK", "0")) == 0:
        os.makedirs(os.path.dirname(DEFAULT_OUT), exist_ok=True)
    try:
        check_writable(args.out)
    except OSError as exc:
        raise SystemExit(f"effnet-fast train --out: {exc}") from exc
    try:
        result = train(args, inputs)
    except UnreadableImage as exc:  # its header was read when the data was loaded, its data is broken (truncated)
        raise SystemExit(f"effnet-fast train --data: {_one_line(exc)}") from exc
    if result.get("interrupted"):
        raise SystemExit(128 + result["interrupted"])


def _one_line(exc):
    """The message of `exc`; raised in a DataLoader worker, it carries the worker's traceback
    and ends with "module.Class: message"."""
    lines = str(exc).strip().splitlines()
    return lines[-1].split(": ", 1)[-1] if len(lines) > 1 else str(exc)


def train_digits(version="b0", fused=False, epochs=6, batch_size=64, size=32, lr=None, out=None, seed=0,
                 limit=None):
    """Train on the digits from Python, through the command's options; `out` (checked
    before training) receives the checkpoint. Returns (model, validation top-1)."""
    argv = ["--version", version, "--fused", str(FUSED_NAMES.get(fused, fused)), "--epochs", str(epochs),
            "--batch", str(batch_size), "--size", str(size), "--seed", str(seed)]
    argv += ["--lr", str(lr)] if lr else []
    argv += ["--limit", str(limit)] if limit else []
    args, inputs = parse_train_args(argv)
    args.out = out
    if out:
        check_writable(out)
    result = train(args, inputs, log=False, plot=False)
    return result["model"], result["history"][-1]["val_top1"]


def train(args, inputs=None, log=True, plot=True, on_epoch_end=None):
    """Train as the options in `args` say (a Namespace from the `train` parser, checked),
    from `inputs` (TrainInputs; loaded from the options when None). `on_epoch_end(record)`
    may return True to stop there (with a checkpoint, as an interrupt would). Returns a
    dict: model (unwrapped), history, interrupted (the signal number or 0), paths."""
    inputs = inputs if inputs is not None else load_inputs(args)
    dist_ctx = Distributed(args.device)
    try:
        with StopRequest() as stop:
            return _run(args, inputs, dist_ctx, stop, log, plot, on_epoch_end)
    finally:
        dist_ctx.close()


@dataclass
class Run:
    """One training run: its options, processes, data, model and optimisation state."""
    args: object
    dist: Distributed
    data: object
    parts: TrainParts
    loaders: dict            # train, val, calibration DataLoaders
    samplers: dict           # their EpochSamplers
    steps: int               # per epoch
    calibrate: int           # BatchNorm recalibration batches before each evaluation
    history: list = field(default_factory=list)
    start_epoch: int = 0
    skip_steps: int = 0      # steps of start_epoch done before a resume
    partial: list = None     # their (loss sum, correct, seen)
    started: float = 0.0     # time.perf_counter() when the first epoch began

    @property
    def num_classes(self):
        return len(self.data.classes)

    def say(self, *args, **kwargs):
        if self.dist.main:
            print(*args, **kwargs)


def _run(args, inputs, dist_ctx, stop, log, plot, on_epoch_end):
    run = _build(args, inputs, dist_ctx)
    if inputs.resume_state is not None:
        _resume(run, inputs.resume_state)
    if dist_ctx.world > 1:
        from torch.nn.parallel import DistributedDataParallel
        device = dist_ctx.device
        run.parts.net = DistributedDataParallel(run.parts.model,
                                                device_ids=[device.index] if device.type == "cuda" else None)
    metrics_path, plot_path = output_paths(args.out) if args.out else (None, None)
    log = log and dist_ctx.main and args.out is not None
    if log:
        with open(metrics_path, "w") as f:
            for record in run.history:
                f.write(json.dumps(record) + "\n")
    _announce(run, inputs)
    run.started = time.perf_counter()
    interrupted, timing = _epochs(run, stop, metrics_path if log else None, on_epoch_end)
    dist_ctx.barrier()

    plot_note = None
    if dist_ctx.main and plot and args.out and run.history:
        plot_note = plot_history(run.history, plot_path)
    result = {"model": run.parts.model, "history": run.history, "interrupted": max(0, interrupted),
              "checkpoint": args.out, "metrics": metrics_path if log else None,
              "plot": plot_path if (plot and args.out and run.history and plot_note is None) else None}
    if dist_ctx.main and run.history and not interrupted:
        _report(run, result, timing, plot_path, plot_note)
    return result


def _build(args, inputs, dist_ctx):
    """The model (initial weights, device, layout, fused layers, sync-BN, EMA), the data
    loaders, the optimiser, the schedule and the gradient scaler of a new run."""
    device = dist_ctx.device
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    data = inputs.data
    num_classes = len(data.classes)
    model = make_model(args, num_classes, device)  # same initial weights on every process
    init = inputs.init_state
    if init is not None:
        model.load_state_dict(init["state_dict"], strict=not init["new_classifier"])
    if init is None or init["new_classifier"]:
        zero_init(model, classifier=True, residual=init is None)
    place_model(model, args, device)
    if args.sync_bn and dist_ctx.world > 1:
        from ..distributed import convert_sync_batchnorm
        model = convert_sync_batchnorm(model)
    elif args.sync_bn and dist_ctx.main:
        print("note: --sync-bn has no effect in a single-process run")
    ema = None
    if args.ema:
        ema = Ema(model, place_model(make_model(args, num_classes, device), args, device), args.ema_decay)
    torch.manual_seed(args.seed * 7919 + dist_ctx.rank)  # augmentation, dropout: per process
    random.seed(args.seed * 7919 + dist_ctx.rank)

    rank, world = dist_ctx.rank, dist_ctx.world
    samplers = {"train": EpochSampler(len(data.train), args.seed, rank, world),
                "val": EpochSampler(len(data.val), args.seed, rank, world, shuffle=False),
                "calibration": EpochSampler(len(data.train), args.seed + 1, rank, world)}
    pin = device.type == "cuda"
    loaders = {"train": make_loader(data.train, args.batch, samplers["train"], args.workers, pin),
               "val": make_loader(data.val, max(args.batch, 64), samplers["val"], args.workers, pin,
                                  drop_last=False),
               "calibration": make_loader(data.train, args.batch, samplers["calibration"], args.workers, pin)}
    for loader in loaders.values():  # worker seeds from these (not the global RNG): a function of (seed, epoch, rank)
        loader.generator = torch.Generator()
    steps = len(samplers["train"]) // args.batch
    calibrate = args.bn_calibrate if args.bn_calibrate is not None else (min(16, max(1, steps // 4))
                                                                         if steps < 1000 else 0)
    opt_cls = torch.optim.SGD if args.opt == "sgd" else torch.optim.AdamW
    opt_kwargs = dict(momentum=args.momentum, nesterov=args.momentum > 0) if args.opt == "sgd" else {}
    optimizer = opt_cls(param_groups(model, args.weight_decay), lr=args.lr, **opt_kwargs)
    warmup_steps, total_steps = round(args.warmup_epochs * steps), args.epochs * steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(lr_factor, warmup_steps=warmup_steps, total_steps=total_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    parts = TrainParts(model, model, optimizer, scheduler, scaler, ema)
    return Run(args, dist_ctx, data, parts, loaders, samplers, steps, calibrate)


def _resume(run, ckpt):
    """Continue checkpoint `ckpt`: weights, optimisation state, epoch, RNG states."""
    parts, args, dist_ctx = run.parts, run.args, run.dist
    parts.model.load_state_dict(ckpt["state_dict"])
    parts.optimizer.load_state_dict(ckpt["optimizer"])
    parts.scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt.get("scaler"):
        parts.scaler.load_state_dict(ckpt["scaler"])
    if parts.ema is not None and ckpt.get("ema") is not None:
        parts.ema.module.load_state_dict(ckpt["ema"])
        parts.ema.updates = ckpt.get("ema_updates", 0)
    run.start_epoch, run.history = ckpt["epoch"], list(ckpt.get("history", []))
    if ckpt.get("step_in_epoch"):
        same = ckpt.get("world_size") == dist_ctx.world and ckpt["args"].get("batch") == args.batch
        if same:
            run.skip_steps, run.partial = ckpt["step_in_epoch"], ckpt.get("partial")
        else:
            run.say(f"note: the checkpoint stopped in epoch {run.start_epoch + 1} with another batch size or "
                    "process count; that epoch starts over")
            parts.scheduler.last_epoch = run.start_epoch * run.steps
    rngs = ckpt.get("rng")
    if rngs and ckpt.get("world_size", 1) == dist_ctx.world and len(rngs) > dist_ctx.rank:
        set_rng_state(rngs[dist_ctx.rank])
    saved = ckpt.get("args", {})
    differ = [f"--{k.replace('_', '-')} {saved[k]!r} -> {getattr(args, k)!r}" for k in OPTION_NAMES
              if k in saved and k not in ("resume", "epochs", "out", "workers", "device", "fused", "init")
              and saved[k] != plain_args(args)[k]]
    if differ:
        run.say("note: options differ from the checkpoint's: " + "; ".join(differ))


def _announce(run, inputs):
    args, dist_ctx, parts = run.args, run.dist, run.parts
    device, amp = dist_ctx.device, AMP_DTYPES[args.amp]
    backend = describe_backend(args.fused, device)
    resumed = ""
    if inputs.resume_state is not None:
        where = (f"the evaluation of epoch {run.start_epoch + 1}" if run.skip_steps == run.steps else
                 f"epoch {run.start_epoch + 1}" + (f" step {run.skip_steps}" if run.skip_steps else ""))
        resumed = f", resumed at {where}"
    run.say(f"training {args.version} ({backend}, {device}{', channels_last' if args.channels_last else ''}"
            f"{', amp ' + args.amp if amp else ''}) on {run.data.description}")
    run.say(f"{args.epochs} epochs x {run.steps} steps of {args.batch}"
            f"{f' x {dist_ctx.world} processes' if dist_ctx.world > 1 else ''}, {args.opt} lr {args.lr:g} "
            f"(warmup {args.warmup_epochs:g} epochs, cosine), weight decay {args.weight_decay:g}, "
            f"label smoothing {args.label_smoothing:g}{', EMA ' + format(args.ema_decay, 'g') if parts.ema else ''}"
            f"{f', BatchNorm statistics recomputed over {run.calibrate} batches before each evaluation' if run.calibrate else ''}"
            f"{resumed}")
    init = inputs.init_state
    if init is not None:
        run.say(f"initial weights: {args.init} ({init['layout']} layout"
                f"{', new classifier for ' + str(run.num_classes) + ' classes' if init['new_classifier'] else ''})")


def save_checkpoint(run, epoch, step_in_epoch=0, partial_sums=None, rng=None, evaluation_pending=False):
    """The run's checkpoint (rank 0 writes it; every rank sends its RNG state: `rng`, or
    the current one)."""
    rngs = [rng if rng is not None else rng_state()]
    if run.dist.world > 1:
        import torch.distributed as dist
        gathered = [None] * run.dist.world
        dist.all_gather_object(gathered, rngs[0])
        rngs = gathered
    args, parts, data = run.args, run.parts, run.data
    if not run.dist.main or not args.out:
        return
    ema = parts.ema
    save_atomic(training_checkpoint(
        state_dict=parts.model.state_dict(), ema=ema.module.state_dict() if ema is not None else None,
        ema_updates=ema.updates if ema is not None else 0, optimizer=parts.optimizer.state_dict(),
        scheduler=parts.scheduler.state_dict(),
        scaler=parts.scaler.state_dict() if parts.scaler.is_enabled() else None,
        epoch=epoch, step_in_epoch=step_in_epoch, partial=partial_sums, evaluation_pending=evaluation_pending,
        world_size=run.dist.world, rng=rngs,
        history=run.history, args=plain_args(args),
        model={"version": args.version, "num_classes": run.num_classes, "classes": list(data.classes)},
        preprocess={"size": args.size, "mean": list(data.mean), "std": list(data.std),
                    "crop_fraction": 0.875 if data.name == "imagefolder" else 1.0, "dataset": data.name}),
        args.out)


def _epochs(run, stop, metrics_path, on_epoch_end):
    """The epochs from run.start_epoch on: train, recalibrate, evaluate, log, checkpoint.
    Returns (the stopping signal, -1 for on_epoch_end, or 0; (images, seconds) trained)."""
    args, dist_ctx, parts = run.args, run.dist, run.parts
    interrupted, train_images, train_time = 0, 0, 0.0
    for epoch in range(run.start_epoch, args.epochs):
        skip = run.skip_steps if epoch == run.start_epoch else 0
        run.samplers["train"].set_epoch(epoch, skip * args.batch)
        run.loaders["train"].generator.manual_seed(args.seed * 1_000_003 + epoch * 1009 + dist_ctx.rank)
        sums = list(run.partial) if (run.partial and epoch == run.start_epoch) else [0.0, 0.0, 0.0]
        progress = Progress(dist_ctx.main, epoch + 1, args.epochs, run.steps, skip)
        t0 = time.perf_counter()
        step, seen_here, interrupted = train_one_epoch(parts, run.loaders["train"], args, dist_ctx, stop, progress,
                                                       epoch, skip, run.steps, sums)
        progress.close()
        epoch_time = time.perf_counter() - t0
        train_images += seen_here * dist_ctx.world
        train_time += epoch_time
        if interrupted:
            save_checkpoint(run, epoch, step, sums)
            run.say(f"interrupted in epoch {epoch + 1} at step {step}/{run.steps}: checkpoint saved to {args.out}; "
                    f"continue with --resume {args.out}")
            break
        rng = rng_state()  # the recalibration draws dropout masks: a resumed evaluation starts from here
        record = _evaluate_epoch(run, epoch, sums, seen_here, epoch_time, stop)
        if record is None:
            save_checkpoint(run, epoch, step, sums, rng=rng, evaluation_pending=True)
            interrupted = int(dist_ctx.max(stop.signum))
            run.say(f"interrupted while evaluating epoch {epoch + 1}: its training is saved to {args.out}; "
                    f"--resume {args.out} evaluates it and continues")
            break
        if metrics_path:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        stop_here = bool(on_epoch_end(record)) if on_epoch_end is not None else False
        stop_here = dist_ctx.any(stop_here or stop.signum)
        save_checkpoint(run, epoch + 1)
        if stop_here and epoch + 1 < args.epochs:
            interrupted = int(dist_ctx.max(stop.signum)) or -1
            run.say(f"stopped after epoch {epoch + 1}: checkpoint saved to {args.out}; continue with "
                    f"--resume {args.out}")
            break
    return interrupted, (train_images, train_time)


def _evaluate_epoch(run, epoch, sums, seen_here, epoch_time, stop):
    """Recalibrate BatchNorm (if asked), evaluate, print and record the epoch; None (nothing
    recorded) when SIGINT / SIGTERM stopped it."""
    args, dist_ctx, parts = run.args, run.dist, run.parts
    device = dist_ctx.device
    loss_sum, correct, seen = dist_ctx.sum(sums)
    evaluated = parts.ema.module if parts.ema is not None else parts.model
    run.say(f"evaluating epoch {epoch + 1}/{args.epochs} on {len(run.data.val)} images", flush=True)
    if dist_ctx.any(stop.signum):
        return None
    if run.calibrate:
        run.samplers["calibration"].set_epoch(epoch)
        run.loaders["calibration"].generator.manual_seed(args.seed * 1_000_003 + epoch * 1009 + dist_ctx.rank + 1)
        if not calibrate_batch_norm(evaluated, run.loaders["calibration"], run.calibrate, device, args, stop,
                                    dist_ctx):
            return None
    evaluated = serving_model(evaluated)  # under --amp, a frozen model runs in autocast's dtype
    result = evaluate(evaluated, run.loaders["val"], device, args, dist_ctx, run.num_classes, stop)
    if result is None:
        return None
    val_loss, top1, top5 = result
    record = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc": correct / seen,
              "val_loss": val_loss, "val_top1": top1, "val_top5": top5,
              "lr": parts.optimizer.param_groups[0]["lr"],
              "images_per_s": seen_here * dist_ctx.world / max(epoch_time, 1e-9), "epoch_s": epoch_time,
              "ema": parts.ema is not None}
    run.history.append(record)
    k = min(5, run.num_classes)
    run.say(f"epoch {epoch + 1}/{args.epochs}: loss {record['train_loss']:.3f} (train top-1 "
            f"{record['train_acc']:.3f}), val loss {val_loss:.3f}, top-1 {top1:.3f}, top-{k} {top5:.3f}"
            f"{' (EMA)' if parts.ema else ''}, {record['images_per_s']:.0f} img/s, {epoch_time:.1f} s", flush=True)
    return record


def _report(run, result, timing, plot_path, plot_note):
    args, history, ema = run.args, run.history, run.parts.ema
    last = history[-1]
    best = max(history, key=lambda h: h["val_top1"])
    total = time.perf_counter() - run.started
    run.say(f"\ndone in {total:.1f} s: validation top-1 {last['val_top1']:.3f} (best {best['val_top1']:.3f}, "
            f"epoch {best['epoch']}), top-{min(5, run.num_classes)} {last['val_top5']:.3f}"
            f"{' with the EMA weights' if ema else ''}")
    train_images, train_time = timing
    if train_time:
        run.say(f"speed: {train_images / train_time:.0f} training images/s on {run.dist.device} "
                f"({describe_backend(args.fused, run.dist.device)})")
    if args.out:
        run.say(f"checkpoint:  {args.out}")
        if result["metrics"]:
            run.say(f"metrics log: {result['metrics']}")
        if result["plot"]:
            run.say(f"plot:        {plot_path}")
        elif plot_note:
            run.say(f"plot:        skipped, {plot_note}")
        run.say(f"next:        effnet-fast predict IMAGE --weights {args.out}   |   "
                f"effnet-fast export --weights {args.out} --format onnx --out model.onnx")


def plot_history(history, path):
    """Loss and accuracy curves as a PNG; returns None without matplotlib (and a note)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no plot"
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.plot(epochs, [h["train_acc"] for h in history], "o-", label="train top-1")
    ax_acc.plot(epochs, [h["val_top1"] for h in history], "o-", label="validation top-1")
    ax_acc.plot(epochs, [h["val_top5"] for h in history], "o--", label="validation top-5")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1.02))
    from matplotlib.ticker import MaxNLocator
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return None

