"""Timing helpers shared by the command line and benchmarks/."""
import time

import torch
import torch.nn.functional as F


def median_seconds(fn, repeats=3, warmup=1):
    """Median wall time of fn() over `repeats` runs after `warmup` runs (fn must
    synchronize its device itself)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def synchronizer(device):
    device = torch.device(device)
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def eval_forward(model, x, run=None):
    """One no-grad forward in eval mode; `run` is model or a compiled wrapper of it."""
    model.eval()
    with torch.no_grad():
        return (run or model)(x)


def train_step(model, opt, x, y, run=None):
    """One SGD step in training mode; returns the loss."""
    model.train()
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy((run or model)(x), y)
    loss.backward()
    opt.step()
    return loss
