"""Timing helpers shared by the command line and benchmarks/."""
import time

import torch
import torch.nn.functional as F


def wall_times(fn, repeats=3, warmup=1):
    """Sorted wall times of `repeats` calls of fn() after `warmup` calls (fn must
    synchronize its device itself)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)


def median_seconds(fn, repeats=3, warmup=1):
    times = wall_times(fn, repeats, warmup)
    return times[len(times) // 2]


def best_seconds(fn, repeats=5, warmup=1):
    """Fastest call: on a shared machine the slower ones measure time slices lost to
    other processes, not the code."""
    return wall_times(fn, repeats, warmup)[0]


def synchronizer(device):
    device = torch.device(device)
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def eval_forward(model, x, run=None):
    """One no-grad forward in eval mode; `run` is model or a compiled wrapper of it."""
    model.eval()
    with torch.no_grad():
        return (model if run is None else run)(x)


def train_step(model, opt, x, y, run=None):
    """One SGD step in training mode; returns the loss."""
    model.train()
    opt.zero_grad(set_to_none=True)
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
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    was_training = model.training
    model.train()
    gen = torch.Generator(device=x.device).manual_seed(0)
    for _ in range(steps):
        model(torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype))
    for m, momentum in zip(bns, saved):
        m.momentum = momentum
    model.train(was_training)
    return model
