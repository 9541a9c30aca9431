"""Squeeze-excitation + the block's 1x1 projection conv at B0's shapes (the fused op never stores x * gate): eager PyTorch against each fused backend
of the device (and torch.compile with --bench-compile). Cases, options: cases.py, conftest.py."""
OP = "squeeze_excite_project"


def test_squeeze_excite_project(bench_case):
    bench_case()
