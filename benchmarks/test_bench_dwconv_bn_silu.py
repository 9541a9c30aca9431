"""Depthwise conv + BatchNorm + SiLU at B0's depthwise shapes: eager PyTorch against each fused backend
of the device (and torch.compile with --bench-compile). Cases, options: cases.py, conftest.py."""
OP = "dwconv_bn_silu"


def test_dwconv_bn_silu(bench_case):
    bench_case()
