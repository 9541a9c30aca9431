"""`effnet-fast train`: image classification training, on one process or several
(`torchrun --nproc-per-node N -m effnet_fast train ...`).

Data: scikit-learn's digits (built in, the default), an ImageFolder directory or
CIFAR-10 in its python format (see data.py). Optimiser SGD (Nesterov) or AdamW with a
cosine schedule after a linear warmup, label smoothing, no weight decay on BatchNorm
and biases, bf16 / fp16 autocast, channels_last, an EMA of the weights. A checkpoint
(atomic, loadable with `torch.load(..., weights_only=True)`) is written after every
epoch and on SIGINT / SIGTERM; `--resume` continues it: the data order is a function
of (seed, epoch) and the RNG states are saved, so a resumed run repeats the losses of
an uninterrupted one. Metrics go to a JSON-lines log and, at the end, a PNG plot
beside the checkpoint."""
import argparse
import contextlib
import functools
import json
import math
import os
import random
import signal
import sys
import time

import torch
import torch.nn.functional as F

from .checkpoint import check_writable, save_atomic
from .efficientnet import VARIANTS, EfficientNet
from .nn.batch_norm import recompute_bn_statistics

CHECKPOINT_FORMAT = "effnet_fast.train"
CHECKPOINT_VERSION = 1
DEFAULT_OUT = os.path.join("checkpoints", "train.pt")
AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Defaults per optimiser when --lr / --weight-decay are not given; SGD's lr is for a global
# batch of 256 and scaled linearly (AdamW's is not scaled).
OPT_DEFAULTS = {"sgd": dict(lr=0.1, weight_decay=5e-5), "adamw": dict(lr=3e-3, weight_decay=0.05)}
PROGRESS_EVERY_S = 30.0  # plain progress lines (stdout not a terminal) at most this often
INIT_LAYOUTS = ("auto", "effnet_fast", "torchvision", "timm")


# ---------------------------------------------------------------- command line

def _float_in(low, high, low_open=False, high_open=False, name="value"):
    def parse(value):
        try:
            x = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
        ok = math.isfinite(x) and (x > low if low_open else x >= low) and (x < high if high_open else x <= high)
        if not ok:
            lo, hi = "(" if low_open else "[", ")" if high_open else "]"
            raise argparse.ArgumentTypeError(f"must be in {lo}{low}, {high}{hi}, got {value}")
        return x
    parse.__name__ = name
    return parse


def add_command(sub):
    """The `train` subcommand of the command line."""
    from .cli import HelpFormatter, default_device, device_arg, fused_arg, non_negative_int, positive_int
    from .data import DATASETS
    p = sub.add_parser(
        "train", formatter_class=HelpFormatter,
        help="train or fine-tune on digits (built in), an ImageFolder directory or CIFAR-10",
        description="Without --data: scikit-learn's digits (no download). Multi-process: torchrun --nproc-per-node N "
                    "-m effnet_fast train ...\n(--batch is per process). A checkpoint is saved after every epoch and "
                    "on Ctrl-C / SIGTERM; --resume continues it.")
    g = p.add_argument_group("data")
    g.add_argument("--data", metavar="DIR", help="ImageFolder (DIR/train/<class>/*, DIR/val/<class>/*, or class "
                   "folders in DIR split by --val-fraction) or the CIFAR-10 python folder")
    g.add_argument("--dataset", default="auto", choices=DATASETS,
                   help="auto: digits without --data, cifar10 when DIR holds data_batch_1, else imagefolder")
    g.add_argument("--val-fraction", type=_float_in(0, 1, True, True), default=0.2,
                   help="held out for validation when there is no val/ folder (or CIFAR-10 test_batch)")
    g.add_argument("--size", type=positive_int, help="input size (default: 32 for digits and CIFAR-10, "
                   "the variant's resolution otherwise)")
    g.add_argument("--crop-scale", type=_float_in(0, 1, low_open=True), help="smallest area of the random resized "
                   "crop (default: 0.5 for digits, 0.08 otherwise)")
    g.add_argument("--hflip", type=_float_in(0, 1), help="horizontal flip probability (default: 0 for digits, 0.5 "
                   "otherwise)")
    g.add_argument("--limit", type=positive_int, help="use at most this many training and validation images")
    g.add_argument("--workers", type=non_negative_int, help="DataLoader worker processes per training process "
                   "(default: 0 for digits, min(4, CPUs) otherwise)")
    g = p.add_argument_group("model")
    g.add_argument("--version", default="b0", choices=sorted(VARIANTS), help="variant")
    g.add_argument("--fused", type=fused_arg, default="auto", metavar="{off,auto,cpu,cuda,triton}",
                   help="fused kernels: auto picks the fastest built backend for --device")
    g.add_argument("--device", type=device_arg, default=default_device(), help="cpu, cuda or cuda:N (under "
                   "torchrun, cuda means cuda:LOCAL_RANK)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels_last model and inputs (the fused kernels' fast layout)")
    g.add_argument("--dropout", type=_float_in(0, 1, high_open=True), help="before the classifier "
                   "(default: 0.1 for digits, the variant's otherwise)")
    g.add_argument("--drop-path", type=_float_in(0, 1, high_open=True), help="stochastic depth of the last block "
                   "(default: 0.05 for digits, 0.2 otherwise)")
    g.add_argument("--init", metavar="PATH", help="start from these weights: our checkpoint or state dict, or "
                   "torchvision's / timm's (a new classifier when the class count differs)")
    g.add_argument("--init-layout", default="auto", choices=INIT_LAYOUTS,
                   help="layout of --init (timm's must be named)")
    g.add_argument("--sync-bn", action="store_true", help="synchronise BatchNorm statistics across processes")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=positive_int, default=5, help="epochs in all (also when resuming)")
    g.add_argument("--batch", type=positive_int, default=32, help="batch size per process")
    g.add_argument("--opt", default="adamw", choices=sorted(OPT_DEFAULTS), help="optimiser")
    g.add_argument("--lr", type=_float_in(0, math.inf, low_open=True), help="peak learning rate (default: adamw "
                   f"{OPT_DEFAULTS['adamw']['lr']:g}; sgd {OPT_DEFAULTS['sgd']['lr']:g} x batch x processes / 256)")
    g.add_argument("--momentum", type=_float_in(0, 1, high_open=True), default=0.9, help="SGD (Nesterov) momentum")
    g.add_argument("--weight-decay", type=_float_in(0, math.inf), help="not applied to BatchNorm and biases "
                   "(default: " + ", ".join(f"{k} {v['weight_decay']:g}" for k, v in OPT_DEFAULTS.items()) + ")")
    g.add_argument("--warmup-epochs", type=_float_in(0, math.inf), default=1.0, help="linear warmup, then cosine")
    g.add_argument("--label-smoothing", type=_float_in(0, 1, high_open=True), default=0.1, help="of the training loss")
    g.add_argument("--amp", default="off", choices=sorted(AMP_DTYPES), help="autocast: bf16 (CPU or GPU) or fp16 "
                   "(GPU, with a gradient scaler)")
    g.add_argument("--ema", action="store_true", help="keep an exponential moving average of the weights and "
                   "evaluate (and export) it")
    g.add_argument("--ema-decay", type=_float_in(0, 1, True, True), default=0.998, help="per step, after a ramp over the first steps")
    g.add_argument("--bn-calibrate", type=non_negative_int, metavar="N",
                   help="before each evaluation, recompute the BatchNorm running statistics over N training "
                   "batches (0: off; default: min(16, steps per epoch // 4) when an epoch has under 1000 steps, "
                   "where the running averages lag the fast-changing weights, else 0)")
    g.add_argument("--seed", type=non_negative_int, default=0, help="initial weights, data split and order, augmentation")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=DEFAULT_OUT, help="checkpoint, written after every epoch; the metrics log "
                   "(.metrics.jsonl) and plot (.png) go beside it")
    g.add_argument("--resume", metavar="PATH", help="continue this checkpoint (pass the same options)")
    p.set_defaults(func=run_command, check=functools.partial(check_args, p))
    return p


OPTION_NAMES = ("data", "dataset", "val_fraction", "size", "crop_scale", "hflip", "limit", "workers", "version",
                "fused", "device", "channels_last", "dropout", "drop_path", "init", "init_layout", "sync_bn",
                "epochs", "batch", "opt", "lr", "momentum", "weight_decay", "warmup_epochs", "label_smoothing",
                "amp", "ema", "ema_decay", "bn_calibrate", "seed", "out", "resume")


def plain_args(args):
    """The options as plain types (for the checkpoint and the log)."""
    out = {}
    for name in OPTION_NAMES:
        value = getattr(args, name, None)
        out[name] = str(value) if isinstance(value, torch.device) else value
    return out


def world_size():
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_args(parser, args):
    """Post-parse validation (parser.error: exit code 2, the option named). Loads the
    data set and the --init / --resume files, kept on `args` for the run."""
    from .cli import check_fused_on_device
    from .data import DataError, load_data, resolve_dataset
    device = torch.device(args.device)
    if args.amp == "fp16" and device.type != "cuda":
        parser.error("--amp fp16 needs a CUDA device (fp16 autocast with a gradient scaler); on the CPU use "
                     "--amp bf16")
    check_fused_on_device(parser, args.fused, device)
    if args.init and args.resume:
        parser.error("--init and --resume together: the --resume checkpoint already holds the weights")
    dataset = resolve_dataset(args.data, args.dataset)
    digits = dataset == "digits"
    if args.size is None:
        args.size = 32 if dataset in ("digits", "cifar10") else VARIANTS[args.version].resolution
    if args.workers is None:
        args.workers = 0 if digits else min(4, os.cpu_count() or 1)
    if args.dropout is None:
        args.dropout = 0.1 if digits else VARIANTS[args.version].dropout
    if args.drop_path is None:
        args.drop_path = 0.05 if digits else 0.2
    for name in ("lr", "weight_decay"):
        if getattr(args, name) is None:
            value = OPT_DEFAULTS[args.opt][name]
            if name == "lr" and args.opt == "sgd":
                value *= args.batch * world_size() / 256
            setattr(args, name, value)
    try:
        args.loaded_data = load_data(args.data, args.dataset, args.size, args.val_fraction, args.seed, args.limit,
                                     args.crop_scale, args.hflip)
    except DataError as exc:
        parser.error(str(exc))
    n_train = len(args.loaded_data.train)
    per_rank = n_train // world_size()
    if args.batch > per_rank:
        where = f" per process ({n_train} images over {world_size()} processes)" if world_size() > 1 else ""
        parser.error(f"--batch {args.batch} is larger than the training set: {per_rank} images{where}; "
                     f"lower --batch (or raise --limit)")
    if len(args.loaded_data.val) == 0:
        parser.error("--val-fraction / --limit leave no validation images")
    num_classes = len(args.loaded_data.classes)
    args.init_state = None
    if args.init:
        try:
            args.init_state = init_state_dict(args.init, args.version, num_classes, args.init_layout)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            parser.error(f"--init {args.init}: {exc}")
    args.resume_state = None
    if args.resume:
        try:
            args.resume_state = read_checkpoint(args.resume)
        except (OSError, ValueError, RuntimeError) as exc:
            parser.error(f"--resume {args.resume}: {exc}")
        model = args.resume_state["model"]
        if model["version"] != args.version or model["num_classes"] != num_classes:
            parser.error(f"--resume {args.resume}: holds a {model['version']} model with {model['num_classes']} "
                         f"classes; this run builds a {args.version} with {num_classes} (pass --version "
                         f"{model['version']} and the same data)")
        if args.resume_state["epoch"] >= args.epochs:
            parser.error(f"--epochs {args.epochs}: the --resume checkpoint has already trained "
                         f"{args.resume_state['epoch']} epochs; raise --epochs to train more")
    if args.sync_bn:
        try:
            import effnet_fast.distributed  # noqa: F401
        except ImportError as exc:
            parser.error(f"--sync-bn needs effnet_fast.distributed, which cannot be imported here: {exc}")
        if not args.fused and device.type == "cpu":
            parser.error("--sync-bn on the CPU needs the fused layers (--fused auto or cpu): the reference "
                         "layers' nn.SyncBatchNorm runs on CUDA tensors only")


def run_command(args):
    if args.out == DEFAULT_OUT and int(os.environ.get("RANK", "0")) == 0:
        os.makedirs(os.path.dirname(DEFAULT_OUT), exist_ok=True)
    try:
        check_writable(args.out)
    except OSError as exc:
        raise SystemExit(f"effnet-fast train --out: {exc}") from exc
    result = train(args)
    if result.get("interrupted"):
        raise SystemExit(128 + result["interrupted"])


def train_digits(version="b0", fused=False, epochs=6, batch_size=64, size=32, lr=None, out=None, seed=0,
                 limit=None):
    """Train on the digits from Python, through the command's options; `out` (checked
    before training) receives the checkpoint. Returns (model, validation top-1)."""
    from .cli import parse_args
    from .cli import FUSED_NAMES
    argv = ["train", "--version", version, "--fused", str(FUSED_NAMES.get(fused, fused)), "--epochs", str(epochs),
            "--batch", str(batch_size), "--size", str(size), "--seed", str(seed)]
    argv += ["--lr", str(lr)] if lr else []
    argv += ["--limit", str(limit)] if limit else []
    args = parse_args(argv)
    args.out = out
    if out:
        check_writable(out)
    result = train(args, log=False, plot=False)
    return result["model"], result["history"][-1]["val_top1"]


# ---------------------------------------------------------------- weights and checkpoints

def read_checkpoint(path):
    """A training checkpoint written by `train` (tensors and plain types only)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError("not a training checkpoint of effnet-fast train (a bare state dict can start a run with "
                         "--init)")
    if ckpt.get("format_version", 0) > CHECKPOINT_VERSION:
        raise ValueError(f"written by a newer effnet_fast (checkpoint format {ckpt['format_version']})")
    return ckpt


CLASSIFIER_KEYS = {"effnet_fast": ("classifier.weight", "classifier.bias"),
                   "torchvision": ("classifier.1.weight", "classifier.1.bias"),
                   "timm": ("classifier.weight", "classifier.bias")}


def init_state_dict(path, version, num_classes, layout="auto"):
    """Weights from `path` (ours, torchvision's or timm's; a training checkpoint or a
    state dict) as our state dict for EfficientNet(version, num_classes); the
    classifier is left out (a new one is trained) when the class count differs."""
    from .convert import _check_fits, convert_state_dict, detect_layout
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError("not a state dict (a dict of tensors) nor a training checkpoint")
    layout = None if layout == "auto" else layout
    detected = detect_layout(state)
    if layout is None and detected == "timm":
        raise ValueError("looks like timm's layout: pass --init-layout timm (for timm's efficientnet_b* weights; "
                         "its TF ports tf_efficientnet_b* are not supported)")
    layout = layout or detected
    weight_key, bias_key = CLASSIFIER_KEYS[layout]
    model = EfficientNet(version, num_classes=num_classes)
    new_head = weight_key in state and state[weight_key].shape[0] != num_classes
    if new_head:
        state = {k: v for k, v in state.items() if k not in (weight_key, bias_key)}
    ours = convert_state_dict(model, state, layout, strict=not new_head)
    if new_head:
        missing = sorted(k for k in model.state_dict().keys() - ours.keys()
                         if not k.endswith("num_batches_tracked") and not k.startswith("classifier."))
        if missing:
            raise KeyError(f"{len(missing)} tensors of a {version} are missing, e.g. {missing[:3]}: another variant?")
    _check_fits(model, ours, strict=not new_head)
    return {"state_dict": ours, "new_classifier": new_head, "layout": layout}


def rng_state():
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if "numpy" in sys.modules:
        import numpy as np
        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {"name": name, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                          "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np
        s = state["numpy"]
        np.random.set_state((s["name"], s["keys"].numpy().astype("uint32"), s["pos"], s["has_gauss"],
                             s["cached_gaussian"]))


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# ---------------------------------------------------------------- pieces of the loop

def lr_factor(step, warmup_steps, total_steps):
    """Linear warmup to 1 over `warmup_steps`, then a cosine to 0 at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model, weight_decay):
    """Weight decay on conv and linear weights only (not BatchNorm, not biases)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Ema:
    """Exponential moving average of a model's parameters and buffers (in `module`,
    a model of the same build); the decay ramps up as (1 + n) / (10 + n) at first."""

    def __init__(self, model, module, decay):
        self.module, self.decay, self.updates = module, decay, 0
        self.module.load_state_dict(model.state_dict())
        self.module.eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model):
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for e, m in zip(self.module.state_dict().values(), model.state_dict().values()):
            if e.dtype.is_floating_point:
                e.lerp_(m.detach(), 1.0 - d)
            else:
                e.copy_(m)


class Distributed:
    """The process group from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK)."""

    def __init__(self, device):
        self.world = world_size()
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device(device)
        self.initialized = False
        if self.world > 1:
            import torch.distributed as dist
            if self.device.type == "cuda":
                if self.device.index is None:
                    self.device = torch.device("cuda", self.local_rank)
                torch.cuda.set_device(self.device)
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            if not dist.is_initialized():
                dist.init_process_group(backend)
                self.initialized = True
        elif self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())

    @property
    def main(self):
        return self.rank == 0

    def sum(self, values):
        """`values` (floats) summed over the processes."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        if self.world > 1:
            import torch.distributed as dist
            dist.all_reduce(t)
        return t.tolist()

    def any(self, flag):
        if self.world == 1:
            return flag
        return self.sum([float(bool(flag))])[0] > 0

    def max(self, value):
        if self.world == 1:
            return value
        import torch.distributed as dist
        t = torch.tensor([float(value)], device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    def barrier(self):
        if self.world > 1:
            import torch.distributed as dist
            dist.barrier()

    def close(self):
        if self.initialized:
            import torch.distributed as dist
            dist.destroy_process_group()
            self.initialized = False


class StopRequest:
    """SIGINT / SIGTERM set a flag the loop checks after every step (a second
    SIGINT interrupts at once). Handlers are installed from the main thread only."""

    def __init__(self):
        self.signum, self.previous = 0, {}

    def _handler(self, signum, frame):
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
              "(Ctrl-C again to quit at once)", file=sys.stderr, flush=True)

    def __enter__(self):
        import threading
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


class Progress:
    """A tqdm bar per epoch on a terminal (rank 0 only); plain lines every
    PROGRESS_EVERY_S seconds otherwise."""

    def __init__(self, enabled, epoch, epochs, steps, start_step=0):
        self.enabled, self.epoch, self.epochs, self.steps = enabled, epoch, epochs, steps
        self.bar, self.last_print, self.start = None, time.perf_counter(), time.perf_counter()
        self.start_step = start_step
        if enabled and sys.stdout.isatty():
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=steps, initial=start_step, desc=f"epoch {epoch}/{epochs}", unit="batch",
                                leave=False, file=sys.stdout, dynamic_ncols=True)
            except ImportError:
                self.bar = None

    def update(self, step, loss, images_per_s):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.3f}, {images_per_s:.0f} img/s", refresh=False)
            self.bar.update(1)
            return
        now = time.perf_counter()
        if now - self.last_print >= PROGRESS_EVERY_S and step < self.steps:
            done = step - self.start_step
            eta = (now - self.start) / max(1, done) * (self.steps - step)
            print(f"  epoch {self.epoch}/{self.epochs} step {step}/{self.steps}: loss {loss:.3f}, "
                  f"{images_per_s:.0f} img/s, ETA {eta:.0f} s", flush=True)
            self.last_print = now

    def close(self):
        if self.bar is not None:
            self.bar.close()


def make_model(args, num_classes, device):
    model = EfficientNet(args.version, num_classes=num_classes, dropout=args.dropout,
                         stochastic_depth=args.drop_path)
    return model


def zero_init(model, classifier=True, residual=True):
    """A new classifier starts at zero (the first loss is ln(classes), not the
    several times larger loss of random logits); from scratch, the last BatchNorm of
    every residual block starts at zero too, so each block starts as the identity."""
    if classifier:
        torch.nn.init.zeros_(model.classifier.weight)
        torch.nn.init.zeros_(model.classifier.bias)
    if residual:
        for block in model.mbconv_blocks():
            if block.use_residual:
                torch.nn.init.zeros_(block.project.bn.weight)


def _place(model, args, device):
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.fused:
        model.set_fused(args.fused)
    return model


def _on_device(x, device, args):
    """A batch of images on `device`, channels_last when the model is."""
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if args.channels_last else x


def _autocast(device, args):
    amp = AMP_DTYPES[args.amp]
    return torch.autocast(device.type, dtype=amp, enabled=amp is not None)


@torch.no_grad()
def calibrate_batch_norm(model, loader, batches, device, args):
    """Running statistics of every BatchNorm recomputed as the plain average over
    `batches` training batches (train-mode forward, no gradients): after a short epoch
    the exponential averages still remember the weights of many steps ago."""
    if batches == 0:
        return
    with _autocast(device, args):
        recompute_bn_statistics(model, (_on_device(x, device, args) for _, (x, _) in zip(range(batches), loader)))


@torch.no_grad()
def evaluate(model, loader, device, args, dist_ctx, num_classes):
    """(loss, top-1, top-k) over the validation set, reduced across processes."""
    model.eval()
    k = min(5, num_classes)
    sums = [0.0, 0.0, 0.0, 0.0]  # loss, top-1, top-k, count
    for x, y in loader:
        x, y = _on_device(x, device, args), y.to(device, non_blocking=True)
        with _autocast(device, args):
            logits = model(x)
        logits = logits.float()
        top = logits.topk(k, dim=1).indices
        sums[0] += F.cross_entropy(logits, y, reduction="sum").item()
        sums[1] += (top[:, 0] == y).sum().item()
        sums[2] += (top == y[:, None]).any(1).sum().item()
        sums[3] += len(y)
    loss, top1, topk, n = dist_ctx.sum(sums)
    return loss / n, top1 / n, topk / n


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


def output_paths(out):
    stem = os.path.splitext(out)[0]
    return f"{stem}.metrics.jsonl", f"{stem}.png"


# ---------------------------------------------------------------- the loop

def train(args, log=True, plot=True, on_epoch_end=None):
    """Train as the options in `args` say (a Namespace from the `train` parser, checked).
    `on_epoch_end(record)` may return True to stop there (with a checkpoint, as an
    interrupt would). Returns a dict: model (unwrapped), history, interrupted (the
    signal number or 0), paths."""
    dist_ctx = Distributed(args.device)
    try:
        with StopRequest() as stop:
            return _train(args, dist_ctx, stop, log, plot, on_epoch_end)
    finally:
        dist_ctx.close()


def _train(args, dist_ctx, stop, log, plot, on_epoch_end):
    from .data import EpochSampler, load_data, make_loader
    device, main = dist_ctx.device, dist_ctx.main
    say = print if main else (lambda *a, **k: None)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    data = getattr(args, "loaded_data", None) or load_data(args.data, args.dataset, args.size, args.val_fraction,
                                                           args.seed, args.limit, args.crop_scale, args.hflip)
    num_classes = len(data.classes)

    model = make_model(args, num_classes, device)  # same initial weights on every process
    init = getattr(args, "init_state", None)
    if init is not None:
        model.load_state_dict(init["state_dict"], strict=not init["new_classifier"])
    if init is None or init["new_classifier"]:
        zero_init(model, classifier=True, residual=init is None)
    _place(model, args, device)
    if args.sync_bn and dist_ctx.world > 1:
        from .distributed import convert_sync_batchnorm
        model = convert_sync_batchnorm(model)
    elif args.sync_bn:
        say("note: --sync-bn has no effect in a single-process run")
    ema = None
    if args.ema:
        ema = Ema(model, _place(make_model(args, num_classes, device), args, device), args.ema_decay)
    torch.manual_seed(args.seed * 7919 + dist_ctx.rank)  # augmentation, dropout: per process
    random.seed(args.seed * 7919 + dist_ctx.rank)

    train_sampler = EpochSampler(len(data.train), args.seed, dist_ctx.rank, dist_ctx.world)
    val_sampler = EpochSampler(len(data.val), args.seed, dist_ctx.rank, dist_ctx.world, shuffle=False)
    pin = device.type == "cuda"
    train_loader = make_loader(data.train, args.batch, train_sampler, args.workers, pin)
    val_loader = make_loader(data.val, max(args.batch, 64), val_sampler, args.workers, pin, drop_last=False)
    # Worker seeds from these generators (not the global RNG): a function of (seed, epoch, rank).
    train_loader.generator, val_loader.generator = torch.Generator(), torch.Generator()
    steps = len(train_sampler) // args.batch
    calibrate = args.bn_calibrate if args.bn_calibrate is not None else (min(16, max(1, steps // 4))
                                                                         if steps < 1000 else 0)
    calib_sampler = EpochSampler(len(data.train), args.seed + 1, dist_ctx.rank, dist_ctx.world)
    calib_loader = make_loader(data.train, args.batch, calib_sampler, args.workers, pin)
    calib_loader.generator = torch.Generator()

    opt_cls = torch.optim.SGD if args.opt == "sgd" else torch.optim.AdamW
    opt_kwargs = dict(momentum=args.momentum, nesterov=args.momentum > 0) if args.opt == "sgd" else {}
    optimizer = opt_cls(param_groups(model, args.weight_decay), lr=args.lr, **opt_kwargs)
    warmup_steps, total_steps = round(args.warmup_epochs * steps), args.epochs * steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(lr_factor, warmup_steps=warmup_steps, total_steps=total_steps))
    amp = AMP_DTYPES[args.amp]
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")

    start_epoch, skip_steps, partial, history = 0, 0, None, []
    ckpt = getattr(args, "resume_state", None)
    if ckpt is not None:
        model.load_state_dict(ckpt["state_dict"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        if ema is not None and ckpt.get("ema") is not None:
            ema.module.load_state_dict(ckpt["ema"])
            ema.updates = ckpt.get("ema_updates", 0)
        start_epoch, history = ckpt["epoch"], list(ckpt.get("history", []))
        if ckpt.get("step_in_epoch"):
            same = ckpt.get("world_size") == dist_ctx.world and ckpt["args"].get("batch") == args.batch
            if same:
                skip_steps, partial = ckpt["step_in_epoch"], ckpt.get("partial")
            else:
                say(f"note: the checkpoint stopped in epoch {start_epoch + 1} with another batch size or process "
                    "count; that epoch starts over")
                scheduler.last_epoch = start_epoch * steps
        rngs = ckpt.get("rng")
        if rngs and ckpt.get("world_size", 1) == dist_ctx.world and len(rngs) > dist_ctx.rank:
            set_rng_state(rngs[dist_ctx.rank])
        if main:
            saved = ckpt.get("args", {})
            differ = [f"--{k.replace('_', '-')} {saved[k]!r} -> {getattr(args, k)!r}" for k in OPTION_NAMES
                      if k in saved and k not in ("resume", "epochs", "out", "workers", "device", "fused", "init")
                      and saved[k] != plain_args(args)[k]]
            if differ:
                say("note: options differ from the checkpoint's: " + "; ".join(differ))
    net = model
    if dist_ctx.world > 1:
        from torch.nn.parallel import DistributedDataParallel
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    metrics_path, plot_path = output_paths(args.out) if args.out else (None, None)
    log = log and main and args.out is not None
    if log:
        with open(metrics_path, "w") as f:
            for record in history:
                f.write(json.dumps(record) + "\n")

    backend = describe_backend(args.fused, device)
    resumed = f", resumed at epoch {start_epoch + 1}" + (f" step {skip_steps}" if skip_steps else "") if ckpt else ""
    say(f"training {args.version} ({backend}, {device}{', channels_last' if args.channels_last else ''}"
        f"{', amp ' + args.amp if amp else ''}) on {data.description}")
    say(f"{args.epochs} epochs x {steps} steps of {args.batch}"
        f"{f' x {dist_ctx.world} processes' if dist_ctx.world > 1 else ''}, {args.opt} lr {args.lr:g} "
        f"(warmup {args.warmup_epochs:g} epochs, cosine), weight decay {args.weight_decay:g}, "
        f"label smoothing {args.label_smoothing:g}{', EMA ' + format(args.ema_decay, 'g') if ema else ''}"
        f"{f', BatchNorm statistics recomputed over {calibrate} batches before each evaluation' if calibrate else ''}"
        f"{resumed}")
    if init is not None:
        say(f"initial weights: {args.init} ({init['layout']} layout"
            f"{', new classifier for ' + str(num_classes) + ' classes' if init['new_classifier'] else ''})")

    def checkpoint(epoch, step_in_epoch=0, partial_sums=None):
        rngs = [rng_state()]
        if dist_ctx.world > 1:
            import torch.distributed as dist
            gathered = [None] * dist_ctx.world
            dist.all_gather_object(gathered, rngs[0])
            rngs = gathered
        if not main or not args.out:
            return
        save_atomic({
            "format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION,
            "state_dict": model.state_dict(),
            "ema": ema.module.state_dict() if ema is not None else None,
            "ema_updates": ema.updates if ema is not None else 0,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "epoch": epoch, "step_in_epoch": step_in_epoch, "partial": partial_sums,
            "world_size": dist_ctx.world, "rng": rngs, "history": history, "args": plain_args(args),
            "model": {"version": args.version, "num_classes": num_classes, "classes": list(data.classes)},
            "preprocess": {"size": args.size, "mean": list(data.mean), "std": list(data.std),
                           "crop_fraction": 0.875 if data.name == "imagefolder" else 1.0, "dataset": data.name},
        }, args.out)

    interrupted, started = 0, time.perf_counter()
    train_images, train_time = 0, 0.0
    for epoch in range(start_epoch, args.epochs):
        net.train()
        skip = skip_steps if epoch == start_epoch else 0
        train_sampler.set_epoch(epoch, skip * args.batch)
        train_loader.generator.manual_seed(args.seed * 1_000_003 + epoch * 1009 + dist_ctx.rank)
        sums = list(partial) if (partial and epoch == start_epoch) else [0.0, 0.0, 0.0]  # loss, correct, seen
        progress = Progress(main, epoch + 1, args.epochs, steps, skip)
        t0, seen_here, step = time.perf_counter(), 0, skip
        for x, y in train_loader:
            x, y = _on_device(x, device, args), y.to(device, non_blocking=True)
            with _autocast(device, args):
                logits = net(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=args.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if ema is not None:
                ema.update(model)
            value = loss.item()
            if not math.isfinite(value):
                raise FloatingPointError(f"the loss is {value} at epoch {epoch + 1} step {step + 1}: lower --lr "
                                         f"(now {args.lr:g}) or raise --warmup-epochs")
            step += 1
            seen_here += len(y)
            sums[0] += value * len(y)
            sums[1] += (logits.detach().argmax(1) == y).sum().item()
            sums[2] += len(y)
            elapsed = time.perf_counter() - t0
            progress.update(step, sums[0] / sums[2], seen_here * dist_ctx.world / max(elapsed, 1e-9))
            if dist_ctx.any(stop.signum) and step < steps:
                interrupted = int(dist_ctx.max(stop.signum))
                break
        progress.close()
        epoch_time = time.perf_counter() - t0
        train_images += seen_here * dist_ctx.world
        train_time += epoch_time
        if interrupted:
            checkpoint(epoch, step, sums)
            say(f"interrupted in epoch {epoch + 1} at step {step}/{steps}: checkpoint saved to {args.out}; "
                f"continue with --resume {args.out}")
            break
        loss_sum, correct, seen = dist_ctx.sum(sums)
        evaluated = ema.module if ema is not None else model
        if calibrate:
            calib_sampler.set_epoch(epoch)
            calib_loader.generator.manual_seed(args.seed * 1_000_003 + epoch * 1009 + dist_ctx.rank + 1)
            calibrate_batch_norm(evaluated, calib_loader, calibrate, device, args)
        val_loss, top1, top5 = evaluate(evaluated, val_loader, device, args, dist_ctx, num_classes)
        record = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc": correct / seen,
                  "val_loss": val_loss, "val_top1": top1, "val_top5": top5, "lr": optimizer.param_groups[0]["lr"],
                  "images_per_s": seen_here * dist_ctx.world / epoch_time, "epoch_s": epoch_time,
                  "ema": ema is not None}
        history.append(record)
        k = min(5, num_classes)
        say(f"epoch {epoch + 1}/{args.epochs}: loss {record['train_loss']:.3f} (train top-1 {record['train_acc']:.3f})"
            f", val loss {val_loss:.3f}, top-1 {top1:.3f}, top-{k} {top5:.3f}{' (EMA)' if ema else ''}, "
            f"{record['images_per_s']:.0f} img/s, {epoch_time:.1f} s", flush=True)
        if log:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        stop_here = bool(on_epoch_end(record)) if on_epoch_end is not None else False
        stop_here = dist_ctx.any(stop_here or stop.signum)
        checkpoint(epoch + 1)
        if stop_here and epoch + 1 < args.epochs:
            interrupted = int(dist_ctx.max(stop.signum)) or -1
            say(f"stopped after epoch {epoch + 1}: checkpoint saved to {args.out}; continue with --resume {args.out}")
            break
    dist_ctx.barrier()

    plot_note = None
    if main and plot and args.out and history:
        plot_note = plot_history(history, plot_path)
    result = {"model": model, "history": history, "interrupted": max(0, interrupted), "checkpoint": args.out,
              "metrics": metrics_path if log else None,
              "plot": plot_path if (plot and args.out and history and plot_note is None) else None}
    if main and history and not interrupted:
        last = history[-1]
        best = max(history, key=lambda h: h["val_top1"])
        total = time.perf_counter() - started
        say(f"\ndone in {total:.1f} s: validation top-1 {last['val_top1']:.3f} (best {best['val_top1']:.3f}, "
            f"epoch {best['epoch']}), top-{min(5, num_classes)} {last['val_top5']:.3f}"
            f"{' with the EMA weights' if ema else ''}")
        if train_time:
            say(f"speed: {train_images / train_time:.0f} training images/s on {device} ({backend})")
        if args.out:
            say(f"checkpoint:  {args.out}")
            if log:
                say(f"metrics log: {metrics_path}")
            if result["plot"]:
                say(f"plot:        {plot_path}")
            elif plot_note:
                say(f"plot:        skipped, {plot_note}")
            say(f"next:        effnet-fast predict IMAGE --weights {args.out}   |   "
                f"effnet-fast export --weights {args.out} --format onnx --out model.onnx")
    return result


def describe_backend(fused, device):
    if not fused:
        return "reference layers, fused off"
    from .ops.backends import resolve_backend
    try:
        name = resolve_backend(fused, device)
    except (RuntimeError, ValueError):
        name = str(fused)
    return f"fused {name}" + (" (auto)" if fused is True else "")
