"""A small training demo on scikit-learn's digits (8x8 images shipped with the
package, so no download): upsampled to 3 x size x size, 10 classes."""
import time

import torch
import torch.nn.functional as F

from .checkpoint import check_writable, save_atomic
from .model import EfficientNet


def digits_tensors(size, seed=0):
    from sklearn.datasets import load_digits
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    x = (x - 0.5) / 0.5
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(y))
    return (x[perm[:split]], y[perm[:split]]), (x[perm[split:]], y[perm[split:]])


def evaluate(model, x, y, batch_size=256):
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), batch_size):
            correct += (model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum().item()
    return correct / len(y)


def train_digits(version="b0", fused=False, epochs=6, batch_size=64, size=32, lr=1e-2, out=None, seed=0,
                 limit=None):
    """Train from scratch; `limit` caps the number of training and test images.
    `out` is checked before training and written atomically after it."""
    if out:
        check_writable(out)
    torch.manual_seed(seed)
    (x_train, y_train), (x_test, y_test) = digits_tensors(size, seed)
    if limit:
        x_train, y_train, x_test, y_test = x_train[:limit], y_train[:limit], x_test[:limit], y_test[:limit]
    model = EfficientNet(version, num_classes=10, fused=fused, dropout=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * (len(y_train) // batch_size))
    print(f"training {version} (fused={fused!r}) on digits: {len(y_train)} train / {len(y_test)} test, "
          f"{size}x{size}, {epochs} epochs")
    for epoch in range(epochs):
        model.train()
        perm, start, total = torch.randperm(len(y_train)), time.perf_counter(), 0.0
        steps = len(y_train) // batch_size
        for i in range(steps):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        acc = evaluate(model, x_test, y_test)
        print(f"epoch {epoch + 1}: loss {total / steps:.3f}, test accuracy {acc:.3f}, "
              f"{time.perf_counter() - start:.1f} s")
    if out:
        save_atomic(model.state_dict(), out)
        print(f"saved weights to {out}")
    return model, acc


def add_command(sub):
    """The `train` subcommand of the command line."""
    from .cli import HelpFormatter, fused_arg, positive_int
    from .model import VARIANTS
    p = sub.add_parser("train", formatter_class=HelpFormatter,
                       help="train on the scikit-learn digits data set (no download)")
    p.add_argument("--version", default="b0", choices=sorted(VARIANTS))
    p.add_argument("--fused", type=fused_arg, default="off", metavar="{off,auto,cpu,cuda,triton}")
    p.add_argument("--epochs", type=positive_int, default=6)
    p.add_argument("--batch", type=positive_int, default=64)
    p.add_argument("--size", type=positive_int, default=32, help="input size")
    p.add_argument("--limit", type=positive_int, help="use at most this many training and test images")
    p.add_argument("--out", help="save the trained weights here")
    p.set_defaults(func=run_command)
    return p


def run_command(args):
    if args.out:
        try:
            check_writable(args.out)
        except OSError as exc:
            raise SystemExit(f"effnet-fast train --out: {exc}") from exc
    train_digits(version=args.version, fused=args.fused, epochs=args.epochs, batch_size=args.batch,
                 size=args.size, out=args.out, limit=args.limit)
