"""The command line runs and prints what it promises."""
import json

import pytest

from effnet_fast.cli import main


def test_info(capsys):
    main(["info"])
    info = json.loads(capsys.readouterr().out)
    assert {"cpu", "cuda", "triton"} <= info.keys()


def test_summary_matches_paper_table(capsys):
    main(["summary", "b0", "b1", "--size", "64"])
    out = capsys.readouterr().out
    assert "5,288,548" in out and "7,794,184" in out
    assert "-> (1, 1000)" in out


def test_bench_runs(capsys):
    main(["bench", "--batch", "4", "--size", "64", "--fused", "reference", "--repeats", "1"])
    assert "speedup" in capsys.readouterr().out


def test_train_one_epoch(capsys, tmp_path):
    pytest.importorskip("sklearn")
    out = tmp_path / "digits.pt"
    main(["train", "--epochs", "1", "--size", "16", "--batch", "32", "--limit", "64", "--fused", "reference", "--out", str(out)])
    assert "epoch 1: loss" in capsys.readouterr().out
    assert out.exists()
