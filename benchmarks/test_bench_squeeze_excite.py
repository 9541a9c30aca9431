"""Squeeze-excitation at B0's SE shapes: eager PyTorch against each fused backend
of the device (and torch.compile with --bench-compile). Cases, options: cases.py, conftest.py."""
OP = "squeeze_excite"


def test_squeeze_excite(bench_case):
    bench_case()
