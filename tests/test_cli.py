"""The command line runs and prints what it promises."""
import json
import subprocess
import sys

import pytest
import torch

from effnet_fast.app.cli import main


def test_info(capsys):
    main(["info"])
    info = json.loads(capsys.readouterr().out)
    assert {"cpu", "cuda", "triton"} <= info["kernels_built"].keys()
    assert "cuda_device_available" in info  # not to be read as "CUDA kernels built"


def test_summary_matches_paper_table(capsys):
    main(["summary", "b0", "b1", "--size", "64"])
    out = capsys.readouterr().out
    assert "5,288,548" in out and "7,794,184" in out
    assert "-> (1, 1000)" in out


def test_bench_runs(capsys):
    main(["bench", "--batch", "4", "--size", "64", "--fused", "reference", "--repeats", "1"])
    assert "speedup" in capsys.readouterr().out


def test_eval_forward_keeps_an_outer_autocast():
    """eval_forward without amp= enters no autocast context of its own: an autocast the
    caller entered stays on (autocast(enabled=False) inside would silently run float32)."""
    from effnet_fast.app.benchmark import eval_forward
    model, x = torch.nn.Conv2d(3, 4, 1), torch.randn(2, 3, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert eval_forward(model, x).dtype == torch.bfloat16
    assert eval_forward(model, x, amp=torch.bfloat16).dtype == torch.bfloat16
    assert eval_forward(model, x).dtype == eval_forward(model, x, amp=torch.float32).dtype == torch.float32


def test_bench_runs_in_bfloat16(capsys):
    """--dtype bfloat16: eager under autocast against the model frozen in bfloat16 (and
    both training under autocast), each checked against float32 first."""
    main(["bench", "--batch", "4", "--size", "64", "--fused", "reference", "--repeats", "1", "--dtype", "bfloat16"])
    out = capsys.readouterr().out
    assert "bfloat16" in out and "eval (frozen)" in out and "training step" in out


def test_train_one_epoch(capsys, tmp_path):
    pytest.importorskip("sklearn")
    out = tmp_path / "digits.pt"
    main(["train", "--epochs", "1", "--size", "16", "--batch", "32", "--limit", "64", "--fused", "reference", "--out", str(out)])
    assert "epoch 1/1: loss" in capsys.readouterr().out
    assert out.exists()


@pytest.mark.parametrize("argv, names", [
    (["bench", "--fused", "gpu"], "--fused"),
    (["bench", "--fused", "false"], "--fused off"),
    (["bench", "--batch", "0"], "--batch"),
    (["bench", "--repeats", "0"], "--repeats"),
    (["bench", "--size", "-3"], "--size"),
    (["bench", "--device", "tpu"], "--device"),
    (["bench", "--device", "cuda"] if not torch.cuda.is_available() else ["bench", "--version", "b8"], "--"),
    (["bench", "--dtype", "float16"] if not torch.cuda.is_available() else ["bench", "--dtype", "int8"], "--dtype"),
    (["predict", "x.png", "--weights", "w.pt", "--amp", "fp16"] if not torch.cuda.is_available()
     else ["predict", "x.png", "--weights", "w.pt", "--amp", "int8"], "--amp"),
    (["summary", "b9"], "b9"),
    (["summary", "--size", "0"], "--size"),
])
def test_bad_values_exit_2_naming_the_option(argv, names, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert names in err and "Traceback" not in err


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = capsys.readouterr().out
    assert "(default: 16)" in out and "[]" not in out


def test_info_into_a_closed_pipe_is_quiet():
    """As `effnet-fast info | head` when head has gone: no traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "effnet_fast", "info"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # long before the interpreter has imported torch and writes
    err = proc.stderr.read()
    proc.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipe" not in err, err
