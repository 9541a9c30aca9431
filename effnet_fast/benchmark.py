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
