"""`effnet-fast train`: learning, exact resume, atomic checkpoints, signals, the data
sources, torchrun, and the parser's refusals. Tiny subsets of the digits at 32x32."""
import os
import pickle
import signal
import subprocess
import sys

import pytest
import torch

from effnet_fast.app import checkpoint as checkpoint_module
from effnet_fast.app.cli import main, parse, parse_args
from effnet_fast.app.train import train

pytest.importorskip("sklearn")
pytest.importorskip("torchvision")

TINY = ["--size", "32", "--batch", "16", "--workers", "0"]


pytestmark = pytest.mark.usefixtures("one_thread")


def run(argv, **kwargs):
    return train(*parse(["train", *argv]), **kwargs)


def losses(history):
    return [(h["train_loss"], h["val_loss"], h["val_top1"]) for h in history]


def test_two_epochs_learn_above_chance(tmp_path):
    out = tmp_path / "ck.pt"
    result = run([*TINY, "--epochs", "2", "--limit", "160", "--out", str(out)])
    history = result["history"]
    assert len(history) == 2
    assert history[-1]["val_top1"] > 0.3, history  # chance: 0.1
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    lines = (tmp_path / "ck.metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and '"val_top5"' in lines[0]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Two epochs straight through (the reference for the resume tests)."""
    out = tmp_path_factory.mktemp("straight") / "ck.pt"
    result = run([*TINY, "--epochs", "2", "--limit", "32", "--ema", "--out", str(out)], plot=False)
    return result["history"]


def test_resume_repeats_the_uninterrupted_losses(tmp_path, uninterrupted):
    out = tmp_path / "ck.pt"
    argv = [*TINY, "--epochs", "2", "--limit", "32", "--ema", "--out", str(out)]
    first = run(argv, plot=False, on_epoch_end=lambda record: True)  # stop after epoch 1
    assert len(first["history"]) == 1
    ckpt = torch.load(out, map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["step_in_epoch"] == 0
    assert {"state_dict", "optimizer", "scheduler", "ema", "rng", "args", "history"} <= ckpt.keys()
    assert ckpt["args"]["batch"] == 16 and ckpt["model"]["classes"] == [str(i) for i in range(10)]
    resumed = run([*argv, "--resume", str(out)], plot=False)
    assert losses(resumed["history"]) == losses(uninterrupted)


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    out = tmp_path / "ck.pt"
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if str(dst) == str(out) and len(calls) > 1:
            raise OSError(28, "No space left on device (simulated, before the rename)")
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint_module.os, "replace", replace)
    with pytest.raises(OSError, match="simulated"):
        run([*TINY, "--epochs", "2", "--limit", "32", "--out", str(out)], plot=False)
    ckpt = torch.load(out, map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")], "temporary file left behind"


def train_with_signal(argv, line, signum):
    """(exit code, output) of `effnet-fast train argv` in a subprocess sent `signum` when it
    prints a line starting with `line`."""
    proc = subprocess.Popen([sys.executable, "-m", "effnet_fast", "train", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    output = []
    for printed in proc.stdout:
        output.append(printed)
        if printed.startswith(line):
            proc.send_signal(signum)
            break
    output.append(proc.stdout.read())
    return proc.wait(timeout=300), "".join(output)


def test_sigint_saves_a_checkpoint_and_exits_cleanly(tmp_path, uninterrupted):
    out = tmp_path / "ck.pt"
    argv = [*TINY, "--epochs", "2", "--limit", "32", "--ema", "--out", str(out)]
    code, text = train_with_signal(argv, "epoch 1/2", signal.SIGINT)
    assert "Traceback" not in text, text
    ckpt = torch.load(out, map_location="cpu", weights_only=True)
    if ckpt["epoch"] == 2:
        pytest.skip("the run finished before the signal arrived")
    assert code == 128 + signal.SIGINT, text
    assert "checkpoint saved" in text and "--resume" in text
    resumed = run([*argv, "--resume", str(out)], plot=False)
    # Stopped in epoch 2 (or at its start): the resumed run repeats the uninterrupted one.
    assert losses(resumed["history"]) == losses(uninterrupted)


def _write_images(folder, n, seed, size=12):
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        pixels = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")


@pytest.mark.parametrize("with_val", [True, False], ids=["train+val", "split"])
def test_imagefolder_trains(tmp_path, with_val):
    for cls in ("cat", "dog"):
        _write_images(tmp_path / "data" / ("train" if with_val else "") / cls, 4, seed=len(cls))
        if with_val:
            _write_images(tmp_path / "data" / "val" / cls, 2, seed=7)
    out = tmp_path / "ck.pt"
    result = run(["--data", str(tmp_path / "data"), "--size", "32", "--batch", "4", "--epochs", "1", "--workers", "0",
                  "--out", str(out)], plot=False)
    assert len(result["history"]) == 1
    ckpt = torch.load(out, map_location="cpu", weights_only=True)
    assert ckpt["model"]["classes"] == ["cat", "dog"] and ckpt["preprocess"]["dataset"] == "imagefolder"


def test_cifar10_folder_trains(tmp_path):
    import numpy as np
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("data_batch_1", 8), ("test_batch", 4)):
        batch = {"batch_label": "tiny", "labels": [i % 10 for i in range(n)],
                 "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f, protocol=2)
    out = tmp_path / "ck.pt"
    result = run(["--data", str(tmp_path), "--batch", "4", "--epochs", "1", "--amp", "bf16", "--out", str(out)],
                 plot=False)  # bf16 autocast on the CPU too
    assert len(result["history"]) == 1
    ckpt = torch.load(out, map_location="cpu", weights_only=True)
    assert ckpt["model"]["classes"][:2] == ["c0", "c1"] and ckpt["preprocess"]["dataset"] == "cifar10"


def test_cifar10_refuses_foreign_pickles(tmp_path):
    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump({"data": subprocess.Popen}, f)  # a class, not numpy arrays
    with pytest.raises(SystemExit) as exc:
        parse_args(["train", "--data", str(tmp_path), "--dataset", "cifar10"])
    assert exc.value.code == 2


def _has_distributed():
    try:
        import effnet_fast.distributed  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.mark.parametrize("sync_bn", [
    pytest.param(False, marks=pytest.mark.slow, id="plain"),
    pytest.param(True, marks=pytest.mark.skipif(not _has_distributed(), reason="effnet_fast.distributed missing"),
                 id="sync-bn"),
])
def test_torchrun_two_processes(tmp_path, sync_bn):
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("no gloo")
    out = tmp_path / "ck.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "effnet_fast", "train", "--epochs", "1", "--limit", "64", "--batch", "8", "--size", "32",
           "--device", "cpu", "--fused", "auto", "--out", str(out)] + (["--sync-bn"] if sync_bn else [])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text
    assert text.count("epoch 1/1:") == 1, text  # rank 0 prints
    assert "x 2 processes" in text
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".pt")) == ["ck.pt"]
    ckpt = torch.load(out, map_location="cpu", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2 and ckpt["epoch"] == 1


@pytest.mark.parametrize("argv, names", [
    (["--epochs", "0"], "--epochs"),
    (["--batch", "0"], "--batch"),
    (["--batch", "5000", "--limit", "64"], "--batch 5000 is larger than the training set"),
    (["--lr", "-1"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--val-fraction", "1.5"], "--val-fraction"),
    (["--label-smoothing", "1"], "--label-smoothing"),
    (["--ema-decay", "1"], "--ema-decay"),
    (["--warmup-epochs", "-1"], "--warmup-epochs"),
    (["--workers", "-1"], "--workers"),
    (["--size", "0"], "--size"),
    (["--opt", "rmsprop"], "--opt"),
    (["--amp", "fp8"], "--amp"),
    (["--amp", "fp16", "--device", "cpu"], "--amp fp16"),
    (["--fused", "gpu"], "--fused"),
    (["--device", "tpu"], "--device"),
    (["--data", "/no/such/dir"], "--data"),
    (["--dataset", "cifar10"], "--dataset cifar10 needs --data"),
    (["--resume", "/no/such/ck.pt"], "--resume"),
    (["--init", "/no/such/w.pt"], "--init"),
    (["--init", "a.pt", "--resume", "b.pt"], "--init and --resume"),
    (["--sync-bn", "--fused", "off", "--device", "cpu"], "--sync-bn"),
])
def test_bad_values_exit_2_naming_the_option(argv, names, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert names in err and "Traceback" not in err, err


def test_resume_refuses_a_finished_or_foreign_checkpoint(tmp_path, capsys):
    bare = tmp_path / "bare.pt"
    torch.save({"w": torch.ones(1)}, bare)
    with pytest.raises(SystemExit) as exc:
        main(["train", "--resume", str(bare)])
    assert exc.value.code == 2 and "not a training checkpoint" in capsys.readouterr().err


def test_init_from_torchvision_weights_with_a_new_classifier(tmp_path):
    from effnet_fast import EfficientNet
    from effnet_fast.convert import to_layout
    source = EfficientNet("b0", num_classes=1000)
    path = tmp_path / "tv.pt"
    torch.save(to_layout(source, "torchvision"), path)
    _, inputs = parse(["train", *TINY, "--limit", "32", "--epochs", "1", "--init", str(path)])
    assert inputs.init_state["new_classifier"] and inputs.init_state["layout"] == "torchvision"
    assert torch.equal(inputs.init_state["state_dict"]["stem.conv.weight"], source.stem.conv.weight)
    assert "classifier.weight" not in inputs.init_state["state_dict"]
