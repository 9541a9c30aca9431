"""Command-line defects 8-12: another variant's --init weights, ImageFolder links,
16-bit PNGs, a signal during evaluation, and one-line refusals (exit code 2) instead of
tracebacks. Tiny runs: the digits at 16x16 or 32x32, a few PNGs made with PIL."""
import os
import signal
import zipfile

import numpy as np
import pytest
import torch

from effnet_fast import EfficientNet
from effnet_fast.app.cli import main
from effnet_fast.app.data import load_data
from effnet_fast.app.predict import preprocess
from effnet_fast.convert import to_layout

from test_train import _write_images, losses, run, train_with_signal

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = ["--size", "16", "--batch", "16", "--workers", "0", "--limit", "32", "--epochs", "1"]


def _refused(argv, capsys, *names):
    """main(argv) exits with code 2 and one line (after the usage) naming `names`, no traceback."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert "Traceback" not in err, err
    message = err.strip().splitlines()[-1]
    for name in names:
        assert name in message, err
    return message


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint of one tiny AdamW epoch (of two) on the digits."""
    out = tmp_path_factory.mktemp("ck") / "ck.pt"
    run([*SMALL, "--epochs", "2", "--out", str(out)], plot=False, on_epoch_end=lambda record: True)
    return out


# ---------------------------------------------------------------- 8: --init of another variant

def _torchvision_b1(path, num_classes):
    import torchvision
    torch.save(torchvision.models.efficientnet_b1(weights=None, num_classes=num_classes).state_dict(), path)
    return []


def _ours_b1(path, num_classes):
    torch.save(EfficientNet("b1", num_classes=num_classes).state_dict(), path)
    return []


def _timm_b1(path, num_classes):
    torch.save(to_layout(EfficientNet("b1", num_classes=num_classes), "timm"), path)
    return ["--init-layout", "timm"]


@pytest.mark.parametrize("num_classes", [10, 1000], ids=["same-classes", "new-classifier"])
@pytest.mark.parametrize("make", [_torchvision_b1, _ours_b1, _timm_b1], ids=["torchvision", "ours", "timm"])
def test_init_refuses_another_variant(tmp_path, capsys, make, num_classes):
    path = tmp_path / "b1.pt"
    extra = make(path, num_classes)
    _refused(["train", *SMALL, "--init", str(path), *extra], capsys, f"--init {path}", "holds a b1",
             "builds a b0", "pass --version b1")


def test_init_accepts_the_same_variant_with_a_new_classifier(tmp_path):
    import torchvision
    path = tmp_path / "b0.pt"
    torch.save(torchvision.models.efficientnet_b0(weights=None).state_dict(), path)
    from effnet_fast.app.cli import parse
    _, inputs = parse(["train", *SMALL, "--init", str(path)])
    assert inputs.init_state["new_classifier"] and inputs.init_state["layout"] == "torchvision"


# ---------------------------------------------------------------- 9: ImageFolder links

def _files(split):
    """Real paths of the image files a Transformed(Subset(ImageFolder)) dataset reads."""
    subset = split.dataset
    return [os.path.realpath(subset.dataset.samples[i][0]) for i in subset.indices]


def test_imagefolder_reads_each_file_once_despite_links(tmp_path):
    root = tmp_path / "data"
    for cls in ("cat", "dog"):
        _write_images(root / cls, 3, seed=len(cls))
    os.symlink("..", root / "cat" / "loop")             # a loop back to the root
    os.symlink("../cat", root / "dog" / "cats")         # a sibling class folder
    os.symlink("0.png", root / "cat" / "again.png")     # the same file twice
    data = load_data(str(root), size=16, val_fraction=0.34)
    train, val = _files(data.train), _files(data.val)
    assert len(train) + len(val) == 6, (train, val)
    assert len(set(train + val)) == 6
    assert not set(train) & set(val)


def test_imagefolder_keeps_a_file_of_val_out_of_training(tmp_path):
    root = tmp_path / "data"
    for cls in ("cat", "dog"):
        _write_images(root / "train" / cls, 3, seed=len(cls))
        _write_images(root / "val" / cls, 1, seed=7)
    os.symlink(root / "train" / "cat" / "1.png", root / "val" / "cat" / "linked.png")
    data = load_data(str(root), size=16)
    train, val = _files(data.train), _files(data.val)
    assert str((root / "train" / "cat" / "1.png").resolve()) in val
    assert not set(train) & set(val) and len(train) == 5 and len(val) == 3


# ---------------------------------------------------------------- 10: 16-bit PNGs

def _gradient_pngs(folder, size=16):
    """A 16-bit greyscale gradient PNG and its 8-bit version; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    wide = np.linspace(0, 65535, size * size).reshape(size, size).astype(np.uint16)
    Image.fromarray(wide).save(folder / "g16.png")
    Image.fromarray(np.round(wide / 257).astype(np.uint8)).save(folder / "g8.png")
    assert Image.open(folder / "g16.png").mode in ("I;16", "I")
    return folder / "g16.png", folder / "g8.png"


def test_predict_scales_16_bit_pngs(tmp_path):
    wide, narrow = _gradient_pngs(tmp_path)
    info = {"size": 16, "crop_fraction": 1.0, "mean": (0.0,) * 3, "std": (1.0,) * 3}
    x = preprocess([wide, narrow], info)
    torch.testing.assert_close(x[0], x[1], atol=1.01 / 255, rtol=0)
    assert x[1].min() < 0.1 < 0.9 < x[1].max()


def test_training_data_scales_16_bit_pngs(tmp_path):
    root = tmp_path / "data"
    for split in ("train", "val"):
        for cls, name in (("a", "g16.png"), ("b", "g8.png")):
            (root / split / cls).mkdir(parents=True)
            os.replace(_gradient_pngs(tmp_path / "tmp")[cls == "b"], root / split / cls / name)
    data = load_data(str(root), size=16)
    std = torch.tensor(data.std)[:, None, None]
    (wide, _), (narrow, _) = data.val[0], data.val[1]
    torch.testing.assert_close(wide * std, narrow * std, atol=1.01 / 255, rtol=0)


# ---------------------------------------------------------------- 11: a signal during evaluation

def test_sigterm_during_evaluation_saves_and_exits_143(tmp_path):
    out = tmp_path / "ck.pt"
    # 90 training images (5 steps), 1,707 validation images: the evaluation takes a while.
    argv = ["--size", "16", "--batch", "16", "--workers", "0", "--epochs", "1", "--val-fraction", "0.95",
            "--out", str(out)]
    code, text = train_with_signal(argv, "evaluating epoch 1/1", signal.SIGTERM)
    assert "Traceback" not in text, text
    assert "evaluating epoch 1/1" in text, text
    ckpt = torch.load(out, map_location="cpu", weights_only=True)
    if ckpt["history"]:
        pytest.skip("the evaluation finished before the signal arrived")
    assert code == 128 + signal.SIGTERM, text
    assert ckpt["epoch"] == 0 and ckpt["step_in_epoch"] == 5 and ckpt["evaluation_pending"], text
    assert "--resume" in text
    resumed = run([*argv, "--resume", str(out)], plot=False)
    straight = run([*argv, "--out", str(tmp_path / "straight.pt")], plot=False)
    assert len(resumed["history"]) == 1
    assert losses(resumed["history"]) == losses(straight["history"])


# ---------------------------------------------------------------- 12: one line, exit code 2

def test_train_refuses_batch_1(capsys):
    _refused(["train", *SMALL, "--batch", "1"], capsys, "--batch 1", "at least 2")


def test_resume_refuses_another_optimiser(checkpoint, capsys):
    _refused(["train", *SMALL, "--epochs", "2", "--opt", "sgd", "--resume", str(checkpoint)], capsys,
             "--opt sgd", "adamw", f"--resume {checkpoint}")


class _Unsafe:
    def __reduce__(self):
        return (os.getpid, ())


def _bad_weights(kind, path):
    if kind == "pickle":
        torch.save({"w": _Unsafe()}, path)
    elif kind == "garbage":
        path.write_bytes(bytes(range(256)) * 4)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("not weights\n")
    else:
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("x", "y")


@pytest.mark.parametrize("kind", ["pickle", "garbage", "empty", "text", "zip"])
@pytest.mark.parametrize("command", ["init", "resume", "predict", "export"])
def test_unreadable_weights_are_refused(tmp_path, capsys, kind, command):
    path = tmp_path / "w.pt"
    _bad_weights(kind, path)
    png = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(png)
    argv = {"init": ["train", *SMALL, "--init", str(path)], "resume": ["train", *SMALL, "--resume", str(path)],
            "predict": ["predict", str(png), "--weights", str(path)],
            "export": ["export", "--weights", str(path), "--format", "pt2", "--out", str(tmp_path / "m.pt2")]}[command]
    option = {"init": "--init", "resume": "--resume"}.get(command, "--weights")
    _refused(argv, capsys, f"{option} {path}", "not a checkpoint or state dict of tensors")


def test_train_refuses_a_file_that_is_not_an_image(tmp_path, capsys):
    root = tmp_path / "data"
    for cls in ("cat", "dog"):
        _write_images(root / cls, 3, seed=len(cls))
    (root / "dog" / "notes.png").write_text("not a picture")
    _refused(["train", "--data", str(root), *SMALL], capsys, "--data", str(root / "dog" / "notes.png"))


def test_predict_refuses_a_file_that_is_not_an_image(checkpoint, tmp_path, capsys):
    bad = tmp_path / "notes.png"
    bad.write_text("not a picture")
    _refused(["predict", str(bad), "--weights", str(checkpoint)], capsys, f"IMAGE {bad}")


def test_predict_refuses_a_decompression_bomb(checkpoint, tmp_path, capsys, monkeypatch):
    bomb = tmp_path / "bomb.png"
    Image.new("RGB", (64, 64)).save(bomb)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4,096 pixels: over twice the limit
    _refused(["predict", str(bomb), "--weights", str(checkpoint)], capsys, f"IMAGE {bomb}", "DecompressionBomb")


@pytest.mark.parametrize("argv, names", [
    (["--batch", "1", "--size", "32"], ["--batch 1", "at least 4"]),
    (["--batch", "2", "--size", "1"], ["--size 1", "at least 32"]),
])
def test_bench_refuses_too_small_inputs(capsys, argv, names):
    _refused(["bench", "--fused", "reference", "--repeats", "1", *argv], capsys, *names)


@pytest.mark.parametrize("blocker", ["metrics-dir", "plot-dir", "parent-file"])
def test_train_refuses_an_out_it_cannot_write_before_training(tmp_path, capsys, blocker):
    out = tmp_path / "run.pt"
    if blocker == "metrics-dir":
        (tmp_path / "run.metrics.jsonl").mkdir()
    elif blocker == "plot-dir":
        (tmp_path / "run.png").mkdir()
    else:
        (tmp_path / "file").write_text("")
        out = tmp_path / "file" / "run.pt"
    with pytest.raises(SystemExit) as exc:
        main(["train", *SMALL, "--out", str(out)])
    captured = capsys.readouterr()
    assert exc.value.code == 2 and f"--out {out}" in captured.err.strip().splitlines()[-1], captured.err
    assert "training b0" not in captured.out
