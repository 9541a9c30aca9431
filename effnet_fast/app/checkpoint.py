"""The checkpoint format of `effnet-fast train`, the one module that writes it and reads it
back (train's --resume and --init, predict, export), and atomic saving.

A training checkpoint is a dict of tensors and plain types, loadable with
torch.load(..., weights_only=True): format "effnet_fast.train", format_version, the
weights ("state_dict", "ema"), the optimiser, scheduler and scaler states, the epoch
and step reached, the RNG states, the metrics history, the options ("args"), the model
("model": version, num_classes, classes) and the preprocessing ("preprocess": size,
mean, std, crop_fraction, dataset). Files are written atomically: the new file is
written beside the old one, flushed to disk, then renamed over it, so an interrupt or
a crash during a save leaves the previous file intact and never a truncated one."""
import contextlib
import os
import pickle
import struct
import tempfile
import zipfile

import torch

from ..convert import TF_PORT_LAYOUT, check_fits, convert_state_dict, detect_layout, load_weights
from ..efficientnet import VARIANTS, EfficientNet, round_channels, round_repeats
from ..freeze import freeze
from ..nn.layers import bn_eps_marker, has_same_padding_marker
from ..pretrained import is_pretrained_name
from .data import IMAGENET_MEAN, IMAGENET_STD

CHECKPOINT_FORMAT = "effnet_fast.train"
CHECKPOINT_VERSION = 1


def check_writable(path):
    """Raise now, before any work, if a file cannot be saved at `path`."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(f"cannot save to {path!r}: it is a directory")
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise NotADirectoryError(f"cannot save to {path!r}: {directory!r} is a file, not a directory")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot save to {path!r}: directory {directory!r} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot save to {path!r}: directory {directory!r} is not writable")


def _new_file_mode(path):
    """The mode a plain open() would give (or the replaced file's); mkstemp's is 0600."""
    if os.path.exists(path):
        return os.stat(path).st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_directory(directory):
    with contextlib.suppress(OSError):  # not every platform can open a directory
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_atomic(obj, path):
    """torch.save(obj, path) through a temporary file in the same directory, fsync
    and os.replace: `path` holds either its old content or the complete new one."""
    check_writable(path)
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _new_file_mode(path))
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt too: never leave the temporary file behind
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)


# What torch.load(weights_only=True) raises on a file that is not tensors it may read: a
# refused class or garbage (UnpicklingError), an empty or truncated file (EOFError), a broken
# archive (RuntimeError, BadZipFile), other bytes in its legacy reader (KeyError, IndexError,
# struct.error, UnicodeDecodeError).
UNREADABLE = (pickle.UnpicklingError, EOFError, RuntimeError, zipfile.BadZipFile, KeyError, IndexError,
              struct.error, UnicodeDecodeError)


def load_tensors(path):
    """torch.load(path, weights_only=True) onto the CPU; a file it cannot read raises
    ValueError("not a checkpoint or state dict of tensors: ...") in one line."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except UNREADABLE as exc:
        raise ValueError(f"not a checkpoint or state dict of tensors: {_why(exc)}") from None


def _why(exc):
    """The gist of torch.load's error: its unpickler's reason, without the advice around it."""
    text = str(exc).split("WeightsUnpickler error:", 1)[-1]
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    line = line.split(" Please use ", 1)[0]
    return f"{type(exc).__name__}: {line}" if line else f"{type(exc).__name__} (empty or truncated file?)"


def output_paths(out):
    """(metrics log, plot) of a run whose checkpoint is `out`."""
    stem = os.path.splitext(out)[0]
    return f"{stem}.metrics.jsonl", f"{stem}.png"


def read_checkpoint(path):
    """A training checkpoint written by `train` (tensors and plain types only)."""
    ckpt = load_tensors(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError("not a training checkpoint of effnet-fast train (a bare state dict can start a run with "
                         "--init)")
    if ckpt.get("format_version", 0) > CHECKPOINT_VERSION:
        raise ValueError(f"written by a newer effnet_fast (checkpoint format {ckpt['format_version']})")
    return ckpt


CLASSIFIER_KEYS = {"effnet_fast": ("classifier.weight", "classifier.bias"),
                   "torchvision": ("classifier.1.weight", "classifier.1.bias"),
                   "timm": ("classifier.weight", "classifier.bias"),
                   TF_PORT_LAYOUT: ("classifier.weight", "classifier.bias")}


def init_state_dict(path, version, num_classes, layout="auto", padding="symmetric"):
    """Weights from `path` (ours, torchvision's or timm's; a training checkpoint or a
    state dict) as our state dict for EfficientNet(version, num_classes, padding=padding);
    the classifier is left out (a new one is trained) when the class count differs.
    `path` may name pretrained weights instead (effnet_fast.pretrained, e.g.
    "torchvision:efficientnet_b0.IMAGENET1K_V1"), downloaded by their source."""
    if _names_pretrained(path):
        state, layout = EfficientNet.from_pretrained(path).state_dict(), "effnet_fast"
    else:
        state = load_tensors(path)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError("not a state dict (a dict of tensors) nor a training checkpoint")
    layout = None if layout == "auto" else layout
    detected = detect_layout(state)
    if layout is None and detected == "timm":
        raise ValueError("looks like timm's layout: pass --init-layout timm for timm's efficientnet_b* weights, "
                         f"or --init-layout {TF_PORT_LAYOUT} --padding same for its TF ports tf_efficientnet_b*")
    if layout == TF_PORT_LAYOUT and padding != "same":
        raise ValueError(f"--init-layout {TF_PORT_LAYOUT}: the TF ports need TF 'same' padding: pass --padding same")
    layout = layout or detected
    check_variant(state, layout, version)
    weight_key, bias_key = CLASSIFIER_KEYS[layout]
    model = EfficientNet(version, num_classes=num_classes, padding=padding)
    new_head = weight_key in state and state[weight_key].shape[0] != num_classes
    if new_head:
        state = {k: v for k, v in state.items() if k not in (weight_key, bias_key)}
    ours = convert_state_dict(model, state, layout, strict=not new_head)
    if new_head:
        missing = sorted(k for k in model.state_dict().keys() - ours.keys()
                         if not k.endswith("num_batches_tracked") and not k.startswith("classifier."))
        if missing:
            raise KeyError(f"{len(missing)} tensors of a {version} are missing, e.g. {missing[:3]}: another variant?")
    check_fits(model, ours, strict=not new_head)
    return {"state_dict": ours, "new_classifier": new_head, "layout": layout}


def _architecture(state, layout):
    """(head channels, block count) of a state dict in `layout`."""
    if layout == "torchvision":  # features.0 the stem, features.1-7 the stages, the last one the head
        stages = [int(k.split(".")[1]) for k in state if k.startswith("features.")]
        head_key = f"features.{max(stages, default=0)}.0.weight"
        blocks = {".".join(k.split(".")[:3]) for k in state if k.startswith("features.") and ".block." in k}
    else:
        head_key = "head.conv.weight" if layout == "effnet_fast" else "conv_head.weight"
        blocks = {".".join(k.split(".")[:3]) for k in state if k.startswith("blocks.")}
    if head_key not in state:
        raise ValueError(f"no head convolution ({head_key}) in these {layout} weights")
    return state[head_key].shape[0], len(blocks)


def infer_version(state_dict, layout="effnet_fast"):
    """The variant a state dict (ours, torchvision's or timm's) was saved from: its head
    width and block count."""
    head, blocks = _architecture(state_dict, layout)
    for name, v in sorted(VARIANTS.items()):
        if (round_channels(v.head, v.width) == head
                and sum(round_repeats(s.repeats, v.depth) for s in v.stages) == blocks):
            return name
    raise ValueError(f"no variant has a {head}-channel head and {blocks} blocks")


def check_variant(state, layout, version):
    """Refuse weights of another variant by name: B1's blocks are a superset of B0's
    with the same shapes, so a partial load would otherwise go through."""
    found = infer_version(state, layout)
    if found != version:
        head, blocks = _architecture(state, layout)
        raise ValueError(f"holds a {found} ({layout} layout: {blocks} blocks, {head}-channel head) but this run "
                         f"builds a {version}; pass --version {found}")


def _names_pretrained(path):
    """True when `path` names pretrained weights ("torchvision:...", "timm:...") rather
    than a file (a file of that name wins)."""
    return is_pretrained_name(str(path)) and not os.path.exists(path)


def load_model(path, version=None, fused=False, use_ema=True):
    """(model in eval mode, info) from a training checkpoint, a bare state dict or
    pretrained weights by name (effnet_fast.pretrained, with the source's preprocessing).
    info: version, num_classes, classes, size, mean, std, crop_fraction, interpolation, ema."""
    if _names_pretrained(path):
        model = EfficientNet.from_pretrained(str(path), fused=fused)
        pre = model.pretrained
        return model, {"version": model.version, "num_classes": len(pre["classes"]), "classes": pre["classes"],
                       "size": pre["size"], "mean": pre["mean"], "std": pre["std"],
                       "crop_fraction": pre["crop_fraction"], "interpolation": pre["interpolation"], "ema": False}
    obj = load_tensors(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: not a checkpoint nor a state dict")
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):
        state = obj["ema"] if use_ema and obj.get("ema") is not None else obj["state_dict"]
        meta, pre = obj.get("model", {}), obj.get("preprocess", {})
        ema = state is obj.get("ema")
    else:
        state, meta, pre, ema = obj, {}, {}, False
    if not state or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path}: not a state dict (a dict of tensors)")
    if "classifier.weight" not in state:
        raise ValueError(f"{path}: weights in {detect_layout(state)}'s layout; train or convert them first (our "
                         "checkpoints and state dicts are read here)")
    version = version or meta.get("version") or infer_version(state)
    num_classes = state["classifier.weight"].shape[0]
    classes = meta.get("classes") or (list(map(str, range(10))) if num_classes == 10 and
                                      pre.get("dataset") == "digits" else [str(i) for i in range(num_classes)])
    padding = "same" if has_same_padding_marker(state) else "symmetric"
    model = EfficientNet(version, num_classes=num_classes, fused=fused, padding=padding, bn_eps=bn_eps_marker(state))
    load_weights(model, state)
    info = {"version": version, "num_classes": num_classes, "classes": list(classes),
            "size": pre.get("size") or model.resolution, "mean": tuple(pre.get("mean") or IMAGENET_MEAN),
            "std": tuple(pre.get("std") or IMAGENET_STD),
            "crop_fraction": pre.get("crop_fraction", 0.875), "interpolation": pre.get("interpolation", "bilinear"),
            "ema": ema}
    return model.eval(), info


def training_checkpoint(*, state_dict, optimizer, scheduler, epoch, history, args, model, preprocess, ema=None,
                        ema_updates=0, scaler=None, step_in_epoch=0, partial=None, world_size=1, rng=(),
                        evaluation_pending=False):
    """The dict `effnet-fast train` saves (see the module docstring); every field a tensor
    or a plain type. evaluation_pending: a signal stopped the evaluation of epoch `epoch`
    (from 0) whose training is done (step_in_epoch = its steps); --resume evaluates it."""
    return {
        "format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION,
        "state_dict": state_dict, "ema": ema, "ema_updates": ema_updates,
        "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler,
        "epoch": epoch, "step_in_epoch": step_in_epoch, "partial": partial,
        "evaluation_pending": evaluation_pending, "world_size": world_size, "rng": list(rng),
        "history": history, "args": args,
        "model": model, "preprocess": preprocess,
    }


def serving_model(model, dtype=None):
    """What to run for inference: a fused EfficientNet frozen (effnet_fast.freeze: every
    BatchNorm folded, once; computing in `dtype`, default the model's), any other model
    as it is, in eval mode (run it under autocast for another dtype)."""
    return freeze(model.eval(), dtype=dtype) if getattr(model, "fused", False) else model.eval()
