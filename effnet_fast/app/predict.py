"""`effnet-fast predict IMAGE... --weights PATH`: the top-k classes of each image.

Loads a checkpoint of `effnet-fast train` (model, class names and preprocessing are
in it) or a bare state dict of ours (the variant is read from its shapes), always
with torch.load(..., weights_only=True)."""
import functools
import os

import torch

from .args import (AMP_DTYPES, FUSED_METAVAR, HelpFormatter, check_amp_on_device, check_fused_on_device,
                   default_device, device_arg, fused_arg, positive_int)
from ..pretrained import is_pretrained_name
from .checkpoint import load_model, serving_model
from .data import UnreadableImage, eval_transform, read_image


def preprocess(paths, info):
    """The images as one normalised batch, as the validation set was fed (eval_transform
    with the model's size, crop, mean, std and interpolation; read as training reads them:
    read_image raises UnreadableImage naming a file that is not an image)."""
    transform = eval_transform(info["size"], info["mean"], info["std"], info["crop_fraction"],
                               interpolation=info.get("interpolation", "bilinear"))
    return torch.stack([transform(read_image(path)) for path in paths])


def predict(paths, weights, topk=5, fused=False, device="cpu", amp=None):
    """[(path, [(class name, probability), ...]), ...], the top `topk` per image, with the
    model of checkpoint `weights` (see effnet_fast.app.checkpoint.load_model); amp: None,
    or the dtype to compute in (torch.bfloat16: a fused model frozen in bfloat16, any
    other under autocast)."""
    return predict_with(load_model(weights, fused=fused), paths, topk, device, amp)


def predict_with(loaded, paths, topk=5, device="cpu", amp=None):
    """predict() with a (model, info) pair load_model returned."""
    return top_classes(loaded, preprocess(paths, loaded[1]), paths, topk, device, amp)


@torch.no_grad()
def top_classes(loaded, batch, paths, topk=5, device="cpu", amp=None):
    """predict_with() of a batch preprocess() made of the images at `paths`."""
    model, info = loaded
    model = serving_model(model, amp).to(device)
    with torch.autocast(torch.device(device).type, dtype=amp, enabled=amp is not None):
        probs = model(batch.to(device)).float().softmax(1)
    k = min(topk, info["num_classes"])
    values, indices = probs.topk(k, dim=1)
    return [(path, [(info["classes"][i], p) for i, p in zip(idx.tolist(), val.tolist())])
            for path, idx, val in zip(paths, indices, values)]


def add_command(sub):
    """The `predict` subcommand of the command line."""
    p = sub.add_parser("predict", formatter_class=HelpFormatter,
                       help="top-k classes of images, with a checkpoint of `train`",
                       description="Class names and preprocessing come from the training checkpoint (the EMA "
                                   "weights when it has them);\na bare state dict of ours works too.")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--weights", required=True, metavar="PATH", help="checkpoint of `effnet-fast train`, a state "
                   "dict of ours, or pretrained weights by name (torchvision:efficientnet_b0.IMAGENET1K_V1, "
                   "timm:tf_efficientnet_b0.ns_jft_in1k; downloaded by torchvision / timm)")
    p.add_argument("--topk", type=positive_int, default=5, help="classes shown per image")
    p.add_argument("--fused", type=fused_arg, default="off", metavar=FUSED_METAVAR, help="fused kernels")
    p.add_argument("--device", type=device_arg, default=default_device(), help="cpu, cuda or cuda:N")
    p.add_argument("--amp", default="off", choices=sorted(AMP_DTYPES),
                   help="compute in bf16 (CPU or GPU) or fp16 (GPU): a fused model is frozen in that dtype, "
                        "an unfused one runs under autocast")
    p.set_defaults(func=run_command, check=functools.partial(check_args, p))
    return p


def check_args(parser, args):
    """Post-parse validation (parser.error: exit code 2); returns the loaded (model, info)
    and the images as a batch."""
    check_fused_on_device(parser, args.fused, args.device)
    check_amp_on_device(parser, args.amp, args.device)
    missing = [path for path in args.images if not os.path.isfile(path)]
    if missing:
        parser.error(f"IMAGE: no such file: {', '.join(missing)}")
    if not os.path.isfile(args.weights) and not is_pretrained_name(args.weights):
        parser.error(f"--weights {args.weights}: no such file (nor a pretrained name such as "
                     "torchvision:efficientnet_b0.IMAGENET1K_V1)")
    try:
        loaded = load_model(args.weights, fused=args.fused)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        parser.error(f"--weights {args.weights}: {exc}")
    try:
        return loaded, preprocess(args.images, loaded[1])
    except UnreadableImage as exc:
        parser.error(f"IMAGE {exc}")


def run_command(args, inputs):
    loaded, batch = inputs
    results = top_classes(loaded, batch, args.images, args.topk, args.device, AMP_DTYPES[args.amp])
    for path, top in results:
        print(f"{path}: " + ", ".join(f"{name} {p:.3f}" for name, p in top))
    return results
