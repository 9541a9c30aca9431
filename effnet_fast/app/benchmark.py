"""Timing helpers shared by the command line and benchmarks/."""
import contextlib
import time
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..efficientnet import EfficientNet
from ..freeze import freeze
from ..nn.batch_norm import recompute_bn_statistics


def times_in_turns(fns, repeats, warmup=1):
    """Sorted wall times of each fn, the fns taking turns (one call each per round) so
    that drift on a shared machine spreads evenly over them; fn must synchronize its
    device itself."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            start = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - start)
    return [sorted(ts) for ts in times]


def median(times):
    return times[len(times) // 2]


def synchronizer(device):
    device = torch.device(device)
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def synchronized(fn, device):
    """fn followed by a wait for `device` (CUDA: torch.cuda.synchronize), so that a wall
    clock around one call measures the work it queued; returns fn's result."""
    sync = synchronizer(device)

    def run():
        out = fn()
        sync()
        return out
    return run


def rounds_for(fn, min_rounds=5, target_seconds=0.3, max_rounds=200):
    """How many timed calls of fn (already warmed up, synchronizing itself) fill about
    `target_seconds`, between min_rounds and max_rounds; from the median of 3 calls."""
    seconds = median(times_in_turns([fn], 3, warmup=0)[0])
    return int(min(max_rounds, max(min_rounds, target_seconds / max(seconds, 1e-9))))


def copy_bandwidth(device="cpu", nbytes=None, repeats=5):
    """Bytes per second of a large float32 tensor copy on `device`, read and write counted
    (512 MiB on a CPU, 1 GiB on a GPU), the fastest of `repeats` copies."""
    device = torch.device(device)
    nbytes = nbytes or (1 << 30 if device.type == "cuda" else 512 << 20)
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    seconds = times_in_turns([synchronized(lambda: dst.copy_(src), device)], repeats, warmup=2)[0][0]
    return 2 * nbytes / seconds


def autocast_to(dtype, device):
    """torch.autocast to dtype on device, or nothing for dtype None / float32: no context at
    all, since autocast(enabled=False) would switch off an autocast the caller entered."""
    if dtype in (None, torch.float32):
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def eval_forward(model, x, run=None, amp=None):
    """One no-grad forward in eval mode (under autocast to `amp`, when given); `run` is
    model or a compiled wrapper of it. eval() only when the model is in training mode: it
    walks every module, a cost no served model pays per call (0.9 ms for B0's frozen model)."""
    if model.training:
        model.eval()
    with torch.no_grad(), autocast_to(amp, x.device):
        return (model if run is None else run)(x)


def train_step(model, opt, x, y, run=None, amp=None):
    """One SGD step in training mode (the forward under autocast to `amp`, when given);
    returns the loss."""
    model.train()
    opt.zero_grad(set_to_none=True)
    with autocast_to(amp, x.device):
        loss = F.cross_entropy((model if run is None else run)(x), y)
    loss.backward()
    opt.step()
    return loss


@torch.no_grad()
def calibrate_bn(model, x, steps=3):
    """Set every BatchNorm's running statistics to the mean over `steps` training-mode
    forwards of x-like random data (momentum=None), as in a trained model. A fresh
    model's eval activations otherwise shrink towards denormal floats through the
    network, which slows CPU code by an order of magnitude and makes timings meaningless."""
    gen = torch.Generator(device=x.device).manual_seed(0)
    return recompute_bn_statistics(model, (torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
                                           for _ in range(steps)))


class BenchRow(NamedTuple):
    name: str
    reference: float  # median seconds
    fused: float
    spread: float  # largest (slowest / fastest - 1) of the two candidates

    @property
    def speedup(self):
        return self.reference / self.fused


def bench_models(version, fused, device, batch, size, channels_last, repeats, train=True, dtype=torch.float32):
    """Median times of the reference and fused `version` models, taking turns, with BN
    statistics calibrated first and the outputs (and first training losses) compared
    before timing; raises AssertionError when they disagree. The eval row times the
    fused model frozen for inference (effnet_fast.freeze), as a user would serve it.
    dtype bfloat16 / float16: the reference runs under autocast, the fused model is
    frozen in dtype (eval) or trains under autocast; outputs are checked against the
    float32 reference within low-precision tolerance."""
    device = torch.device(device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=gen).to(device)
    target = torch.randint(0, 1000, (batch,), generator=gen).to(device)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=layout)
    torch.manual_seed(0)
    # At least 16 images for the statistics: a tiny batch at a tiny size leaves 1x1 maps
    # with near-zero variances, whose huge BN scales amplify rounding differences.
    calibration = x.new_empty((max(batch, 16),) + tuple(x.shape[1:]))
    reference = calibrate_bn(EfficientNet(version).to(device), calibration).to(memory_format=layout)
    fused_model = EfficientNet(version, fused=fused).to(device).to(memory_format=layout)
    fused_model.load_state_dict(reference.state_dict())
    models = (reference, fused_model)

    amp = None if dtype == torch.float32 else dtype
    served = (reference, freeze(fused_model.eval(), dtype=dtype))
    expected = eval_forward(reference, x)
    for label, out in (("the reference under autocast", eval_forward(reference, x, amp=amp)),
                       ("the frozen fused model", eval_forward(served[1], x))):
        _check_output(label, out, expected, dtype)
    rows = [_row("eval (frozen)", [synchronized(lambda m=m, a=a: eval_forward(m, x, amp=a), device)
                                   for m, a in zip(served, (amp, None))], repeats)]
    if train:
        opts = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in models]
        states = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
        losses = []
        for m, o in zip(models, opts):
            torch.manual_seed(0)  # the same dropout and stochastic-depth draws for both
            losses.append(train_step(m, o, x, target, amp=amp).item())
        if abs(losses[0] - losses[1]) > LOSS_TOLERANCE[dtype] * max(1.0, abs(losses[0])):
            raise AssertionError(f"first training losses differ: reference {losses[0]:.6f}, fused {losses[1]:.6f} "
                                 "(batch statistics over very few values, as on 1x1 maps of a tiny batch, are "
                                 "ill-conditioned: try a larger --batch or --size)")
        for m, s in zip(models, states):
            m.load_state_dict(s)
        rows.append(_row("training step", [synchronized(lambda m=m, o=o: train_step(m, o, x, target, amp=amp), device)
                                           for m, o in zip(models, opts)], repeats))
    return rows


# Largest relative difference of the first training losses, and of the eval logits from the
# float32 reference (max |diff| over max |logit|), by dtype.
LOSS_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 3e-2, torch.float16: 1e-2}
OUTPUT_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.1, torch.float16: 2e-2}


def relative_error(actual, expected):
    """max |actual - expected| / max |expected|, in float32: how far a low-precision output is."""
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


def _check_output(label, actual, expected, dtype):
    if dtype == torch.float32:
        torch.testing.assert_close(actual, expected, atol=1e-3, rtol=1e-3,
                                   msg=lambda m: f"{label}'s output differs from the reference: {m}")
        return
    rel = relative_error(actual, expected)
    if rel > OUTPUT_TOLERANCE[dtype]:
        raise AssertionError(f"{label}'s {dtype} output differs from the float32 reference by {rel:.3g} of its "
                             f"largest logit (accepted: {OUTPUT_TOLERANCE[dtype]})")


def _row(name, fns, repeats):
    times = times_in_turns(fns, repeats)
    spread = max(ts[-1] / ts[0] - 1 for ts in times)
    return BenchRow(name, median(times[0]), median(times[1]), spread)
