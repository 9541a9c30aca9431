"""What a training run needs from its surroundings: the process group torchrun describes,
SIGINT / SIGTERM turned into a request to stop, a progress display, and the random
number generators' state (saved in checkpoints so that a resumed run repeats an
uninterrupted one)."""
import os
import random
import signal
import sys
import threading
import time

import torch

PROGRESS_EVERY_S = 30.0  # plain progress lines (stdout not a terminal) at most this often


def world_size():
    """The number of training processes (torchrun's WORLD_SIZE; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


class Distributed:
    """The process group from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK)."""

    def __init__(self, device):
        self.world = world_size()
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device(device)
        self.initialized = False
        if self.world > 1:
            import torch.distributed as dist
            if self.device.type == "cuda":
                if self.device.index is None:
                    self.device = torch.device("cuda", self.local_rank)
                torch.cuda.set_device(self.device)
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            if not dist.is_initialized():
                dist.init_process_group(backend)
                self.initialized = True
        elif self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())

    @property
    def main(self):
        return self.rank == 0

    def sum(self, values):
        """`values` (floats) summed over the processes."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        if self.world > 1:
            import torch.distributed as dist
            dist.all_reduce(t)
        return t.tolist()

    def any(self, flag):
        if self.world == 1:
            return flag
        return self.sum([float(bool(flag))])[0] > 0

    def max(self, value):
        if self.world == 1:
            return value
        import torch.distributed as dist
        t = torch.tensor([float(value)], device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    def barrier(self):
        if self.world > 1:
            import torch.distributed as dist
            dist.barrier()

    def close(self):
        if self.initialized:
            import torch.distributed as dist
            dist.destroy_process_group()
            self.initialized = False


class StopRequest:
    """SIGINT / SIGTERM set a flag the loop checks after every training step and every
    batch of evaluation and BatchNorm recalibration (a second SIGINT interrupts at once).
    Handlers are installed from the main thread only."""

    def __init__(self):
        self.signum, self.previous = 0, {}

    def _handler(self, signum, frame):
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this batch and saving a checkpoint "
              "(Ctrl-C again to quit at once)", file=sys.stderr, flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


class Progress:
    """A tqdm bar per epoch on a terminal (rank 0 only); plain lines every
    PROGRESS_EVERY_S seconds otherwise."""

    def __init__(self, enabled, epoch, epochs, steps, start_step=0):
        self.enabled, self.epoch, self.epochs, self.steps = enabled, epoch, epochs, steps
        self.bar, self.last_print, self.start = None, time.perf_counter(), time.perf_counter()
        self.start_step = start_step
        if enabled and sys.stdout.isatty():
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=steps, initial=start_step, desc=f"epoch {epoch}/{epochs}", unit="batch",
                                leave=False, file=sys.stdout, dynamic_ncols=True)
            except ImportError:
                self.bar = None

    def update(self, step, loss, images_per_s):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.3f}, {images_per_s:.0f} img/s", refresh=False)
            self.bar.update(1)
            return
        now = time.perf_counter()
        if now - self.last_print >= PROGRESS_EVERY_S and step < self.steps:
            done = step - self.start_step
            eta = (now - self.start) / max(1, done) * (self.steps - step)
            print(f"  epoch {self.epoch}/{self.epochs} step {step}/{self.steps}: loss {loss:.3f}, "
                  f"{images_per_s:.0f} img/s, ETA {eta:.0f} s", flush=True)
            self.last_print = now

    def close(self):
        if self.bar is not None:
            self.bar.close()


def rng_state():
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if "numpy" in sys.modules:
        import numpy as np
        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {"name": name, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                          "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np
        s = state["numpy"]
        np.random.set_state((s["name"], s["keys"].numpy().astype("uint32"), s["pos"], s["has_gauss"],
                             s["cached_gaussian"]))


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x
