"""The digits demo's validation accuracy in each precision: trains the demo (`effnet-fast
train`, fused="cpu"), then evaluates its checkpoint on the validation split in eager
float32, frozen float32, frozen bfloat16 and eager bf16 autocast.

  python benchmarks/digits_precision.py
"""
import os
import tempfile

import torch

from effnet_fast import freeze
from effnet_fast.app.checkpoint import load_model
from effnet_fast.app.cli import parse
from effnet_fast.app.train import train


def main():
    out = os.path.join(tempfile.mkdtemp(), "digits_demo.pt")
    args, inputs = parse(["train", "--out", out, "--workers", "0", "--fused", "cpu"])
    train(args, inputs, plot=False)
    model, _ = load_model(out, fused="cpu")
    val = inputs.data.val
    xs, ys = zip(*[val[i] for i in range(len(val))])
    x, y = torch.stack(xs).to(memory_format=torch.channels_last), torch.tensor(ys)
    with torch.no_grad():
        ref = model.eval().set_fused(False)(x)
        res = {"eager fp32": ref}
        for name, dt in (("frozen fp32", torch.float32), ("frozen bf16", torch.bfloat16)):
            res[name] = freeze(model.set_fused("cpu"), dtype=dt)(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            res["eager bf16 autocast"] = model.set_fused(False)(x)
    for name, logits in res.items():
        acc = (logits.float().argmax(1) == y).float().mean().item()
        rel = ((logits.float() - ref).abs().max() / ref.abs().max()).item()
        print(f"{name:<22} val top-1 {acc * 100:.2f}% ({len(y)} images), max rel diff vs eager fp32 {rel:.2e}")


if __name__ == "__main__":
    main()
