"""BatchNorm + SiLU after B0's stem, expand and head convs: eager PyTorch against each fused backend
of the device (and torch.compile with --bench-compile). Cases, options: cases.py, conftest.py."""
OP = "bn_silu"


def test_bn_silu(bench_case):
    bench_case()
