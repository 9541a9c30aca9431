"""One quick pass over the benchmark suite's parametrization (benchmarks/, pytest-benchmark):
every single-op case at tiny sizes is built and checked against eager once, nothing timed.
The whole-model rows are left to tests/test_cli.py (effnet_fast.app.benchmark.bench_models)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_cases_agree_with_eager():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/", "-q", "--benchmark-disable", "--bench-quick",
         "--bench-ops", "dwconv_bn_silu,squeeze_excite,squeeze_excite_project,bn_silu", "-p", "no:cacheprovider"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout
