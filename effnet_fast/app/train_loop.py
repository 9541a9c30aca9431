"""The pieces of the training loop: one epoch, evaluation, BatchNorm recalibration, the
learning-rate schedule, parameter groups and the EMA of the weights."""
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..efficientnet import EfficientNet
from ..nn.batch_norm import recompute_bn_statistics
from .args import AMP_DTYPES


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


def make_model(args, num_classes, device):
    """The EfficientNet the options describe, on the CPU with reference layers (see place_model)."""
    model = EfficientNet(args.version, num_classes=num_classes, dropout=args.dropout,
                         stochastic_depth=args.drop_path, padding=getattr(args, "padding", "symmetric"))
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
            if block.use_residual:  # the branch's last BatchNorm (V2's "conv" blocks have no projection)
                last = block.project if block.project is not None else block.conv
                torch.nn.init.zeros_(last.bn.weight)


def place_model(model, args, device):
    """`model` on `device`, channels_last and fused as the options say."""
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.fused:
        model.set_fused(args.fused)
    return model


def to_device(x, device, args):
    """A batch of images on `device`, channels_last when the model is."""
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if args.channels_last else x


def autocast_for(device, args):
    """The autocast context of --amp (disabled for off)."""
    amp = AMP_DTYPES[args.amp]
    return torch.autocast(device.type, dtype=amp, enabled=amp is not None)


def _until_stopped(batches, stop, dist_ctx):
    """`batches`, cut short (after at least one) once a process got SIGINT / SIGTERM. The
    processes agree after every batch, so all stop at the same one (synchronised
    BatchNorm would wait forever for a process that stopped)."""
    for batch in batches:
        yield batch
        if dist_ctx.any(stop.signum):
            return


@torch.no_grad()
def calibrate_batch_norm(model, loader, batches, device, args, stop, dist_ctx):
    """Running statistics of every BatchNorm recomputed as the plain average over
    `batches` training batches (train-mode forward, no gradients): after a short epoch
    the exponential averages still remember the weights of many steps ago. Returns
    False when SIGINT / SIGTERM (`stop`) cut it short."""
    if batches == 0:
        return True
    inputs = _until_stopped((x for _, (x, _) in zip(range(batches), loader)), stop, dist_ctx)
    with autocast_for(device, args):
        recompute_bn_statistics(model, (to_device(x, device, args) for x in inputs))
    return not dist_ctx.any(stop.signum)


@torch.no_grad()
def evaluate(model, loader, device, args, dist_ctx, num_classes, stop):
    """(loss, top-1, top-k) over the validation set, reduced across processes; None when a
    process got SIGINT / SIGTERM (`stop`) before the end. The processes may hold one
    batch more or less of the set, so each checks its own flag and they agree at the end."""
    model.eval()
    k = min(5, num_classes)
    sums = [0.0, 0.0, 0.0, 0.0]  # loss, top-1, top-k, count
    for x, y in loader:
        if stop.signum:
            break
        x, y = to_device(x, device, args), y.to(device, non_blocking=True)
        with autocast_for(device, args):
            logits = model(x)
        logits = logits.float()
        top = logits.topk(k, dim=1).indices
        sums[0] += F.cross_entropy(logits, y, reduction="sum").item()
        sums[1] += (top[:, 0] == y).sum().item()
        sums[2] += (top == y[:, None]).any(1).sum().item()
        sums[3] += len(y)
    loss, top1, topk, n, stopped = dist_ctx.sum([*sums, float(bool(stop.signum))])
    return None if stopped else (loss / n, top1 / n, topk / n)


@dataclass
class TrainParts:
    """What a training step updates: the model, `net` (the model or its DDP wrapper), the
    optimiser, the scheduler (stepped per batch), the gradient scaler and the EMA (or None)."""
    model: torch.nn.Module
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    ema: object = None


def train_one_epoch(parts, loader, args, dist_ctx, stop, progress, epoch, step, steps, sums):
    """Train epoch `epoch` (from 0) over `loader` from step `step` of `steps`, adding (loss sum, correct, seen) into
    `sums`. Stops early when a process got SIGINT / SIGTERM (`stop`). Returns (the next
    step, the images seen here, the signal number that stopped the epoch or 0)."""
    device = dist_ctx.device
    parts.net.train()
    seen_here, started = 0, time.perf_counter()
    for x, y in loader:
        x, y = to_device(x, device, args), y.to(device, non_blocking=True)
        with autocast_for(device, args):
            logits = parts.net(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=args.label_smoothing)
        parts.optimizer.zero_grad(set_to_none=True)
        parts.scaler.scale(loss).backward()
        parts.scaler.step(parts.optimizer)
        parts.scaler.update()
        parts.scheduler.step()
        if parts.ema is not None:
            parts.ema.update(parts.model)
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"the loss is {value} at epoch {epoch + 1} step {step + 1}: lower --lr "
                                     f"(now {args.lr:g}) or raise --warmup-epochs")
        step += 1
        seen_here += len(y)
        sums[0] += value * len(y)
        sums[1] += (logits.detach().argmax(1) == y).sum().item()
        sums[2] += len(y)
        elapsed = time.perf_counter() - started
        progress.update(step, sums[0] / sums[2], seen_here * dist_ctx.world / max(elapsed, 1e-9))
        if dist_ctx.any(stop.signum) and step < steps:
            return step, seen_here, int(dist_ctx.max(stop.signum))
    return step, seen_here, 0
