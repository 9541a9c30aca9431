"""Checkpoints are written atomically and the destination is checked before
training (defect 6)."""
import io
import os

import pytest
import torch

from effnet_fast.app import cli
from effnet_fast.app.checkpoint import check_writable, save_atomic
from effnet_fast.app.train import train_digits


def _interrupted_torch_save(real_save):
    """torch.save that writes half of the file, then is interrupted (as by SIGINT)."""
    def save(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()[: len(buffer.getvalue()) // 2]
        if isinstance(f, (str, os.PathLike)):
            with open(f, "wb") as out:
                out.write(data)
        else:
            f.write(data)
        raise KeyboardInterrupt
    return save


def test_interrupted_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "weights.pt"
    torch.save({"w": torch.arange(3)}, out)
    monkeypatch.setattr(torch, "save", _interrupted_torch_save(torch.save))
    with pytest.raises(KeyboardInterrupt):
        train_digits(epochs=1, batch_size=16, size=16, limit=32, out=str(out))
    assert torch.equal(torch.load(out, weights_only=True)["w"], torch.arange(3))
    assert os.listdir(tmp_path) == ["weights.pt"], "temporary file left behind"


def test_save_atomic_writes_a_loadable_file(tmp_path):
    path = tmp_path / "x.pt"
    save_atomic({"a": torch.ones(2)}, path)
    save_atomic({"a": torch.zeros(2)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.zeros(2))
    assert os.listdir(tmp_path) == ["x.pt"]


def test_bad_out_path_is_reported_before_training(tmp_path, capsys):
    bad = tmp_path / "no_such_dir" / "weights.pt"
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--epochs", "1", "--limit", "32", "--size", "16", "--out", str(bad)])
    captured = capsys.readouterr()
    assert exc.value.code == 2 and "does not exist" in captured.err  # refused by the parser's check
    assert "training" not in captured.out
    with pytest.raises(IsADirectoryError):
        check_writable(tmp_path)
