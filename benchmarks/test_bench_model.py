"""The whole EfficientNet-B0 at 224x224: eval forward and one SGD training step. Eager PyTorch against each fused backend
of the device (and torch.compile with --bench-compile). Cases, options: cases.py, conftest.py."""
OP = "model"


def test_model(bench_case):
    bench_case()
