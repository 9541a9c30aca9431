"""Every Python block of the README runs as written, each alone in a fresh interpreter.

A block that needs a download or a data folder is fenced as ```python no-run``` and skipped."""
import pathlib
import re
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
FENCE = re.compile(r"^```python([^\n]*)\n(.*?)^```", re.S | re.M)


def python_blocks():
    text = README.read_text()
    blocks = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        marks = [pytest.mark.skip(reason="marked no-run (a download or a data folder)")] if "no-run" in match[1] else []
        blocks.append(pytest.param(match[2], marks=marks, id=f"line{line}"))
    return blocks


def test_readme_has_python_blocks():
    assert len(python_blocks()) >= 4


@pytest.mark.parametrize("code", python_blocks())
def test_readme_block_runs(code, tmp_path):
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"README block failed:\n{code}\n--- stderr ---\n{result.stderr[-3000:]}"
