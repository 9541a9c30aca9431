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


def test_suite_takes_the_v2_shapes():
    """--bench-versions b0,v2_s adds V2-S's own layer shapes (its Fused-MBConv BN + SiLU at
    192x192 and 96x96, its depthwise convs) and its whole model; an unknown variant is refused."""
    def collect(*args):
        return subprocess.run([sys.executable, "-m", "pytest", "benchmarks/", "-q", "--collect-only",
                               "-p", "no:cacheprovider", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    b0 = collect("--bench-devices", "cpu", "--bench-layouts", "channels_last", "--bench-modes", "eval")
    both = collect("--bench-devices", "cpu", "--bench-layouts", "channels_last", "--bench-modes", "eval",
                   "--bench-versions", "b0,v2_s")
    assert b0.returncode == 0 and both.returncode == 0, both.stdout[-3000:] + both.stderr[-3000:]
    for new in ("-24x192-", "-96x96-", "-256x48k3s2-", "-v2_s-"):
        assert new in both.stdout and new not in b0.stdout, new
    assert "-32x112-" in both.stdout  # B0's shapes stay
    bad = collect("--bench-versions", "b9")
    assert bad.returncode != 0 and "unknown ['b9']" in bad.stdout + bad.stderr
