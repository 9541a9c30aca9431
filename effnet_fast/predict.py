"""`effnet-fast predict IMAGE... --weights PATH`: the top-k classes of each image.

Loads a checkpoint of `effnet-fast train` (model, class names and preprocessing are
in it) or a bare state dict of ours (the variant is read from its shapes), always
with torch.load(..., weights_only=True)."""
import functools
import os

import torch

from .efficientnet import VARIANTS, EfficientNet, round_channels, round_repeats

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def infer_version(state_dict):
    """The variant a state dict of ours was saved from (head width and block count)."""
    from .efficientnet import B0_STAGES, HEAD_CHANNELS
    head = state_dict["head.conv.weight"].shape[0]
    blocks = {".".join(k.split(".")[:3]) for k in state_dict if k.startswith("blocks.")}
    for name, v in sorted(VARIANTS.items()):
        if (round_channels(HEAD_CHANNELS, v.width) == head
                and sum(round_repeats(s.repeats, v.depth) for s in B0_STAGES) == len(blocks)):
            return name
    raise ValueError(f"no variant has a {head}-channel head and {len(blocks)} blocks")


def load_model(path, version=None, fused=False, use_ema=True):
    """(model in eval mode, info) from a training checkpoint or a bare state dict.
    info: version, num_classes, classes, size, mean, std, crop_fraction, ema."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
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
        from .convert import detect_layout
        raise ValueError(f"{path}: weights in {detect_layout(state)}'s layout; train or convert them first (our "
                         "checkpoints and state dicts are read here)")
    version = version or meta.get("version") or infer_version(state)
    num_classes = state["classifier.weight"].shape[0]
    classes = meta.get("classes") or (list(map(str, range(10))) if num_classes == 10 and
                                      pre.get("dataset") == "digits" else [str(i) for i in range(num_classes)])
    model = EfficientNet(version, num_classes=num_classes, fused=fused)
    from .convert import load_weights
    load_weights(model, state)
    info = {"version": version, "num_classes": num_classes, "classes": list(classes),
            "size": pre.get("size") or model.resolution, "mean": tuple(pre.get("mean") or IMAGENET_MEAN),
            "std": tuple(pre.get("std") or IMAGENET_STD),
            "crop_fraction": pre.get("crop_fraction", 0.875), "ema": ema}
    return model.eval(), info


def preprocess(paths, info):
    """The images as one normalised batch, as the validation set was fed."""
    from PIL import Image
    from torchvision.transforms import v2
    size = info["size"]
    steps = [v2.ToImage()]
    if info["crop_fraction"] < 1.0:
        steps += [v2.Resize(int(size / info["crop_fraction"]), antialias=True), v2.CenterCrop(size)]
    else:
        steps += [v2.Resize((size, size), antialias=True)]
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(info["mean"], info["std"])]
    transform = v2.Compose(steps)
    images = []
    for path in paths:
        with Image.open(path) as im:
            images.append(transform(im.convert("RGB")))
    return torch.stack(images)


@torch.no_grad()
def predict(paths, weights, topk=5, fused=False, device="cpu"):
    """[(path, [(class name, probability), ...]), ...], the top `topk` per image."""
    model, info = load_model(weights, fused=fused)
    model.to(device)
    x = preprocess(paths, info).to(device)
    probs = model(x).float().softmax(1)
    k = min(topk, info["num_classes"])
    values, indices = probs.topk(k, dim=1)
    return [(path, [(info["classes"][i], p) for i, p in zip(idx.tolist(), val.tolist())])
            for path, idx, val in zip(paths, indices, values)]


def add_command(sub):
    from .cli import HelpFormatter, default_device, device_arg, fused_arg, positive_int
    p = sub.add_parser("predict", formatter_class=HelpFormatter,
                       help="top-k classes of images, with a checkpoint of `train`",
                       description="Class names and preprocessing come from the training checkpoint (the EMA "
                                   "weights when it has them);\na bare state dict of ours works too.")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--weights", required=True, metavar="PATH", help="checkpoint of `effnet-fast train` or a state "
                   "dict of ours")
    p.add_argument("--topk", type=positive_int, default=5, help="classes shown per image")
    p.add_argument("--fused", type=fused_arg, default="off", metavar="{off,auto,cpu,cuda,triton}", help="fused kernels")
    p.add_argument("--device", type=device_arg, default=default_device(), help="cpu, cuda or cuda:N")
    p.set_defaults(func=run_command, check=functools.partial(check_args, p))
    return p


def check_args(parser, args):
    from .cli import check_fused_on_device
    check_fused_on_device(parser, args.fused, args.device)
    missing = [path for path in args.images if not os.path.isfile(path)]
    if missing:
        parser.error(f"IMAGE: no such file: {', '.join(missing)}")
    if not os.path.isfile(args.weights):
        parser.error(f"--weights {args.weights}: no such file")
    try:
        args.loaded = load_model(args.weights, fused=args.fused)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        parser.error(f"--weights {args.weights}: {exc}")


def run_command(args):
    results = predict(args.images, args.weights, args.topk, args.fused, args.device)
    for path, top in results:
        print(f"{path}: " + ", ".join(f"{name} {p:.3f}" for name, p in top))
    return results
