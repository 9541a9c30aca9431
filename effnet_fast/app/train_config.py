"""The options of `effnet-fast train`: the parser, the defaults that depend on the data
set, the checks (exit code 2 and a message naming the option), and the files the run
starts from (`TrainInputs`: the data set, --init weights, --resume checkpoint)."""
import argparse
import functools
import math
import os
from typing import NamedTuple, Optional

import torch

from ..convert import TF_PORT_LAYOUT
from ..efficientnet import PADDINGS, VARIANTS
from .args import (AMP_DTYPES, FUSED_METAVAR, HelpFormatter, check_amp_on_device, check_fused_on_device,
                   default_device, device_arg, float_in, fused_arg, non_negative_int, positive_int)
from .checkpoint import check_writable, init_state_dict, output_paths, read_checkpoint
from .data import DATASETS, DataError, load_data, resolve_dataset
from .runtime import world_size

DEFAULT_OUT = os.path.join("checkpoints", "train.pt")
# Defaults per optimiser when --lr / --weight-decay are not given; SGD's lr is for a global
# batch of 256 and scaled linearly (AdamW's is not scaled).
OPT_DEFAULTS = {"sgd": dict(lr=0.1, weight_decay=5e-5), "adamw": dict(lr=3e-3, weight_decay=0.05)}
INIT_LAYOUTS = ("auto", "effnet_fast", "torchvision", "timm", TF_PORT_LAYOUT)


def add_parser(sub):
    """The parser of the `train` subcommand, with its check (effnet_fast.app.train adds
    the function that runs it)."""
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
    g.add_argument("--val-fraction", type=float_in(0, 1, True, True), default=0.2,
                   help="held out for validation when there is no val/ folder (or CIFAR-10 test_batch)")
    g.add_argument("--size", type=positive_int, help="input size (default: 32 for digits and CIFAR-10, "
                   "the variant's resolution otherwise)")
    g.add_argument("--crop-scale", type=float_in(0, 1, low_open=True), help="smallest area of the random resized "
                   "crop (default: 0.5 for digits, 0.08 otherwise)")
    g.add_argument("--hflip", type=float_in(0, 1), help="horizontal flip probability (default: 0 for digits, 0.5 "
                   "otherwise)")
    g.add_argument("--limit", type=positive_int, help="use at most this many training and validation images")
    g.add_argument("--workers", type=non_negative_int, help="DataLoader worker processes per training process "
                   "(default: 0 for digits, min(4, CPUs) otherwise)")
    g = p.add_argument_group("model")
    g.add_argument("--version", default="b0", choices=sorted(VARIANTS), help="variant")
    g.add_argument("--fused", type=fused_arg, default="auto", metavar=FUSED_METAVAR,
                   help="fused kernels: auto picks the fastest built backend for --device")
    g.add_argument("--device", type=device_arg, default=default_device(), help="cpu, cuda or cuda:N (under "
                   "torchrun, cuda means cuda:LOCAL_RANK)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels_last model and inputs (the fused kernels' fast layout)")
    g.add_argument("--dropout", type=float_in(0, 1, high_open=True), help="before the classifier "
                   "(default: 0.1 for digits, the variant's otherwise)")
    g.add_argument("--drop-path", type=float_in(0, 1, high_open=True), help="stochastic depth of the last block "
                   "(default: 0.05 for digits, 0.2 otherwise)")
    g.add_argument("--init", metavar="PATH", help="start from these weights: our checkpoint or state dict, "
                   "torchvision's / timm's, or pretrained weights by name (torchvision:efficientnet_b0.IMAGENET1K_V1, "
                   "timm:tf_efficientnet_b0.ns_jft_in1k with --padding same); a new classifier when the class "
                   "count differs")
    g.add_argument("--init-layout", default="auto", choices=INIT_LAYOUTS,
                   help=f"layout of --init (timm's must be named: timm for efficientnet_b*, {TF_PORT_LAYOUT} for "
                        "its TF ports tf_efficientnet_b*, with --padding same)")
    g.add_argument("--padding", default="symmetric", choices=PADDINGS,
                   help="conv padding: symmetric (k // 2, torchvision's and timm's efficientnet_b*) or same "
                        "(TensorFlow's, for the TF ports; BatchNorm eps 1e-3)")
    g.add_argument("--sync-bn", action="store_true", help="synchronise BatchNorm statistics across processes")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=positive_int, default=5, help="epochs in all (also when resuming)")
    g.add_argument("--batch", type=positive_int, default=32, help="batch size per process")
    g.add_argument("--opt", default="adamw", choices=sorted(OPT_DEFAULTS), help="optimiser")
    g.add_argument("--lr", type=float_in(0, math.inf, low_open=True), help="peak learning rate (default: adamw "
                   f"{OPT_DEFAULTS['adamw']['lr']:g}; sgd {OPT_DEFAULTS['sgd']['lr']:g} x batch x processes / 256)")
    g.add_argument("--momentum", type=float_in(0, 1, high_open=True), default=0.9, help="SGD (Nesterov) momentum")
    g.add_argument("--weight-decay", type=float_in(0, math.inf), help="not applied to BatchNorm and biases "
                   "(default: " + ", ".join(f"{k} {v['weight_decay']:g}" for k, v in OPT_DEFAULTS.items()) + ")")
    g.add_argument("--warmup-epochs", type=float_in(0, math.inf), default=1.0, help="linear warmup, then cosine")
    g.add_argument("--label-smoothing", type=float_in(0, 1, high_open=True), default=0.1, help="of the training loss")
    g.add_argument("--amp", default="off", choices=sorted(AMP_DTYPES), help="autocast: bf16 (CPU or GPU) or fp16 "
                   "(GPU, with a gradient scaler)")
    g.add_argument("--ema", action="store_true", help="keep an exponential moving average of the weights and "
                   "evaluate (and export) it")
    g.add_argument("--ema-decay", type=float_in(0, 1, True, True), default=0.998, help="per step, after a ramp over the first steps")
    g.add_argument("--bn-calibrate", type=non_negative_int, metavar="N",
                   help="before each evaluation, recompute the BatchNorm running statistics over N training "
                   "batches (0: off; default: min(16, steps per epoch // 4) when an epoch has under 1000 steps, "
                   "where the running averages lag the fast-changing weights, else 0)")
    g.add_argument("--seed", type=non_negative_int, default=0, help="initial weights, data split and order, augmentation")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=DEFAULT_OUT, help="checkpoint, written after every epoch; the metrics log "
                   "(.metrics.jsonl) and plot (.png) go beside it")
    g.add_argument("--resume", metavar="PATH", help="continue this checkpoint (pass the same options)")
    p.set_defaults(check=functools.partial(check_args, p))
    return p


OPTION_NAMES = ("data", "dataset", "val_fraction", "size", "crop_scale", "hflip", "limit", "workers", "version",
                "fused", "device", "channels_last", "dropout", "drop_path", "init", "init_layout", "padding", "sync_bn",
                "epochs", "batch", "opt", "lr", "momentum", "weight_decay", "warmup_epochs", "label_smoothing",
                "amp", "ema", "ema_decay", "bn_calibrate", "seed", "out", "resume")


def plain_args(args):
    """The options as plain types (for the checkpoint and the log)."""
    out = {}
    for name in OPTION_NAMES:
        value = getattr(args, name, None)
        out[name] = str(value) if isinstance(value, torch.device) else value
    return out


class TrainInputs(NamedTuple):
    """What a run starts from, loaded once the options are checked."""
    data: object                     # effnet_fast.app.data.Data
    init_state: Optional[dict]       # init_state_dict() of --init, or None
    resume_state: Optional[dict]     # the --resume checkpoint, or None


def _raise(message):
    raise ValueError(message)


def resolve_defaults(args):
    """Fill in the options whose default depends on the data set, the variant or the
    optimiser (in place)."""
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


def load_inputs(args, fail=_raise):
    """TrainInputs for checked options with their defaults resolved; `fail(message)` is
    called with a message naming the option when a file or value cannot be used
    (parser.error on the command line; by default it raises ValueError)."""
    try:
        data = load_data(args.data, args.dataset, args.size, args.val_fraction, args.seed, args.limit,
                         args.crop_scale, args.hflip)
    except DataError as exc:
        fail(str(exc))
    n_train = len(data.train)
    per_rank = n_train // world_size()
    if args.batch > per_rank:
        where = f" per process ({n_train} images over {world_size()} processes)" if world_size() > 1 else ""
        fail(f"--batch {args.batch} is larger than the training set: {per_rank} images{where}; "
             f"lower --batch (or raise --limit)")
    if len(data.val) == 0:
        fail("--val-fraction / --limit leave no validation images")
    num_classes = len(data.classes)
    init_state = None
    if args.init:
        try:
            init_state = init_state_dict(args.init, args.version, num_classes, args.init_layout, args.padding)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            fail(f"--init {args.init}: {exc}")
    resume_state = None
    if args.resume:
        try:
            resume_state = read_checkpoint(args.resume)
        except (OSError, ValueError, RuntimeError) as exc:
            fail(f"--resume {args.resume}: {exc}")
        saved_opt = resume_state.get("args", {}).get("opt")
        if saved_opt and saved_opt != args.opt:
            fail(f"--opt {args.opt}: the --resume {args.resume} checkpoint was trained with --opt {saved_opt}, "
                 f"whose state another optimiser cannot continue; pass --opt {saved_opt}")
        model = resume_state["model"]
        if model["version"] != args.version or model["num_classes"] != num_classes:
            fail(f"--resume {args.resume}: holds a {model['version']} model with {model['num_classes']} "
                 f"classes; this run builds a {args.version} with {num_classes} (pass --version "
                 f"{model['version']} and the same data)")
        if resume_state["epoch"] >= args.epochs:
            fail(f"--epochs {args.epochs}: the --resume checkpoint has already trained "
                 f"{resume_state['epoch']} epochs; raise --epochs to train more")
    return TrainInputs(data, init_state, resume_state)


def check_args(parser, args):
    """Post-parse validation (parser.error: exit code 2, the option named); resolves the
    defaults and returns the run's TrainInputs."""
    device = torch.device(args.device)
    check_amp_on_device(parser, args.amp, device)
    check_fused_on_device(parser, args.fused, device)
    if args.init and args.resume:
        parser.error("--init and --resume together: the --resume checkpoint already holds the weights")
    if args.batch < 2:
        parser.error(f"--batch {args.batch}: training needs at least 2 images per batch (BatchNorm normalises "
                     "each channel over the batch, and the last stages' maps are 1x1 at small sizes)")
    check_outputs(parser, args.out)
    resolve_defaults(args)
    inputs = load_inputs(args, parser.error)
    if args.sync_bn and not args.fused and device.type == "cpu":
        parser.error("--sync-bn on the CPU needs the fused layers (--fused auto or cpu): the reference "
                     "layers' nn.SyncBatchNorm runs on CUDA tensors only")
    return inputs


def check_outputs(parser, out):
    """parser.error unless the checkpoint, metrics log and plot can be written (a missing
    default folder is made when the run starts)."""
    if not out or (out == DEFAULT_OUT and not os.path.exists(os.path.dirname(DEFAULT_OUT))):
        return
    for path in (out, *output_paths(out)):
        try:
            check_writable(path)
        except OSError as exc:
            parser.error(f"--out {out}: {exc}")


def parse_train_args(argv):
    """(options, TrainInputs) of `effnet-fast train` arguments `argv` (without "train")."""
    parser = argparse.ArgumentParser(prog="effnet-fast", formatter_class=HelpFormatter)
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", *argv])
    return args, args.check(args)
