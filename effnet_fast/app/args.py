"""Argument types and checks shared by the commands (a leaf module: every command imports
it, it imports no command). Bad values are refused by the parser: exit code 2 and a
message naming the option."""
import argparse
import math

import torch

from ..ops.backends import BACKENDS, REGISTRY, resolve_backend

# Values of --fused: the model's `fused` argument they mean (the backend names come from
# the registry, "reference" included for checks).
FUSED_CHOICES = {"off": False, "false": False, "auto": True, "true": True, **{name: name for name in REGISTRY}}
FUSED_NAMES = {False: "off", True: "auto"}
FUSED_METAVAR = "{" + ",".join(("off", "auto", *BACKENDS)) + "}"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults and keeps the descriptions' line breaks; no "(default: None)" after
    options whose help says what their absence means."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def int_at_least(minimum):
    """An argparse type: an integer >= minimum."""
    def parse(value):
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value!r}") from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {number}")
        return number
    parse.__name__ = f"integer >= {minimum}"
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def float_in(low, high, low_open=False, high_open=False, name="value"):
    """An argparse type: a finite float in [low, high] (either end open)."""
    def parse(value):
        try:
            x = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
        ok = math.isfinite(x) and (x > low if low_open else x >= low) and (x < high if high_open else x <= high)
        if not ok:
            lo, hi = "(" if low_open else "[", ")" if high_open else "]"
            raise argparse.ArgumentTypeError(f"must be in {lo}{low}, {high}{hi}, got {value}")
        return x
    parse.__name__ = name
    return parse


def fused_arg(value):
    """--fused off|auto|<backend> (true/false accepted) -> the model's `fused`."""
    key = value.lower()
    if key not in FUSED_CHOICES:
        names = ", ".join(("off", "auto", *BACKENDS)) + " (or true/false)"
        raise argparse.ArgumentTypeError(f"unknown backend {value!r}; choose one of {names}")
    return FUSED_CHOICES[key]


def device_arg(value):
    """--device cpu|cuda|cuda:N -> a torch.device that exists here."""
    try:
        device = torch.device(value)
    except RuntimeError as exc:
        raise argparse.ArgumentTypeError(f"not a device: {value!r} ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{value!r}: no CUDA device is available (torch.cuda.is_available() is False)")
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{value!r}: effnet_fast runs on 'cpu' or 'cuda' devices")
    return device


# --amp: autocast's dtype (train), the inference dtype (predict).
AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_amp_on_device(parser, amp, device):
    """parser.error (exit 2) for fp16 on a CPU, which has no fast float16 arithmetic."""
    if amp == "fp16" and torch.device(device).type != "cuda":
        parser.error("--amp fp16 needs a CUDA device; on the CPU use --amp bf16")


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_fused_on_device(parser, fused, device):
    """parser.error (exit 2) when the --fused backend cannot run on --device."""
    if not fused:
        return
    try:
        resolve_backend(fused, device)
    except (RuntimeError, ValueError) as exc:
        parser.error(f"--fused {fused if isinstance(fused, str) else 'auto'} on --device {device}: {exc}")


def describe_backend(fused, device):
    """'fused cpu (auto)', 'reference layers, fused off', ...: what --fused means on `device`."""
    if not fused:
        return "reference layers, fused off"
    try:
        name = resolve_backend(fused, device)
    except (RuntimeError, ValueError):
        name = str(fused)
    return f"fused {name}" + (" (auto)" if fused is True else "")
