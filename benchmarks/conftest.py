"""pytest-benchmark suite of the fused ops and the whole model (see cases.py).

  pytest benchmarks/ --benchmark-only                      every case on every device here
  pytest benchmarks/ --benchmark-only -k cpu --benchmark-group-by=group    side-by-side tables
  pytest benchmarks/ --benchmark-disable --bench-quick     each case checked once, tiny shapes

Options below choose the parametrization; each benchmark's group holds the
implementations of one shape and configuration, its extra_info the bytes moved, the
memory floor (those bytes over the copy bandwidth measured once per session) and the
time's ratio to it.
"""
import os
import sys
import time

import pytest

# The benchmarks import their shared module as `cases`.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def pytest_addoption(parser):
    g = parser.getgroup("effnet_fast benchmarks")
    g.addoption("--bench-devices", default=None, help="comma list (default: cpu, and cuda when available)")
    g.addoption("--bench-dtypes", default=None,
                help="comma list of float32,bfloat16,float16 (default: float32 on cpu, float32,bfloat16 on cuda)")
    g.addoption("--bench-layouts", default="nchw,channels_last")
    g.addoption("--bench-modes", default="eval,train")
    g.addoption("--bench-ops", default=None, help="comma list of ops (default: all)")
    g.addoption("--bench-compile", action="store_true", help="add torch.compile rows (compiles every shape: slow)")
    g.addoption("--bench-batch", type=int, default=None, help="batch (default: 16 on cpu, 128 on cuda)")
    g.addoption("--bench-shapes", type=int, default=None, help="only the first N shapes of each op")
    g.addoption("--bench-versions", default="b0",
                help="comma list of variants whose layer shapes (and whole model) are benchmarked, e.g. b0,v2_s")
    g.addoption("--bench-time", type=float, default=0.2, help="seconds of timed calls per benchmark (about)")
    g.addoption("--bench-min-rounds", type=int, default=5)
    g.addoption("--bench-budget-s", type=float, default=None,
                help="skip the cases that start after this many seconds (the results so far are still saved)")
    g.addoption("--bench-quick", action="store_true",
                help="correctness pass: batch 2, one shape per op, sizes capped at 16, model batch 8 at 64x64")
    g.addoption("--bench-interpret", action="store_true",
                help="add Triton rows on the CPU through Triton's interpreter (checks only: use with "
                     "--benchmark-disable; sets TRITON_INTERPRET=1)")


def pytest_configure(config):
    if config.getoption("--bench-interpret", False):
        os.environ["TRITON_INTERPRET"] = "1"  # before effnet_fast.kernels is imported
    config._bench_start = time.time()


def _list(value):
    return [v.strip() for v in value.split(",") if v.strip()]


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    import torch
    from cases import DTYPES, LAYOUTS, MODES, all_cases
    opt = metafunc.config.getoption
    devices = _list(opt("--bench-devices") or ("cpu,cuda" if torch.cuda.is_available() else "cpu"))
    default_dtypes = {"cpu": ["float32"], "cuda": ["float32", "bfloat16"]}
    dtypes = {d: _list(opt("--bench-dtypes")) if opt("--bench-dtypes") else default_dtypes.get(d, ["float32"])
              for d in devices}
    layouts, modes = _list(opt("--bench-layouts")), _list(opt("--bench-modes"))
    for value, known in ([sum(dtypes.values(), []), DTYPES], [layouts, LAYOUTS], [modes, MODES]):
        unknown = set(value) - set(known)
        if unknown:
            raise pytest.UsageError(f"unknown {sorted(unknown)}; choose from {list(known)}")
    from effnet_fast.efficientnet import VARIANTS
    unknown = set(_list(opt("--bench-versions"))) - VARIANTS.keys()
    if unknown:
        raise pytest.UsageError(f"--bench-versions: unknown {sorted(unknown)}; choose from {sorted(VARIANTS)}")
    quick = opt("--bench-quick")
    op = metafunc.module.OP
    # Quick runs: a small batch, but not for the model, whose last maps are 1x1 at 32x32
    # inputs: batch statistics over a few values are ill-conditioned (see bench_models).
    quick_batch = 8 if op == "model" else 2
    batch = {d: opt("--bench-batch") or (quick_batch if quick else 128 if d == "cuda" else 16) for d in devices}
    ops = _list(opt("--bench-ops")) if opt("--bench-ops") else None
    cases = [] if ops and op not in ops else all_cases(
        op, devices, dtypes, layouts, modes, batch, compile_rows=opt("--bench-compile"),
        interpret=opt("--bench-interpret"), shapes=1 if quick else opt("--bench-shapes"),
        max_size=(64 if op == "model" else 16) if quick else None, versions=_list(opt("--bench-versions")))
    metafunc.parametrize("case", cases, ids=[c.id for c in cases])


def pytest_collection_modifyitems(config, items):
    """With --bench-ops, the ops run in the order listed (so a budget cuts the last ones)."""
    ops = config.getoption("--bench-ops")
    if ops:
        order = {op: i for i, op in enumerate(_list(ops))}
        items.sort(key=lambda item: order.get(getattr(getattr(item, "module", None), "OP", None), len(order)))


_bandwidths = {}


@pytest.fixture
def copy_bandwidth(case):
    """Bytes per second of a large copy on the case's device, measured once per session."""
    from effnet_fast.app.benchmark import copy_bandwidth as measure
    if case.device not in _bandwidths:
        quick = case.max_size is not None  # --bench-quick: the floor is not looked at
        _bandwidths[case.device] = measure(case.device, nbytes=(64 << 20) if quick else None)
    return _bandwidths[case.device]


@pytest.fixture
def bench_case(request, benchmark, case):
    """Runs a case: builds it, checks it against eager once, then times it."""
    budget = request.config.getoption("--bench-budget-s")
    if budget is not None and time.time() - request.config._bench_start > budget:
        pytest.skip(f"--bench-budget-s {budget:g} spent")
    if case.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device")
    return lambda: run_case(request, benchmark, case)


def run_case(request, benchmark, case):
    import torch
    from cases import DTYPES, TOLERANCE, build, max_rel_error
    from effnet_fast.app.benchmark import rounds_for, synchronized
    impl, eager = build(case)
    info = benchmark.extra_info
    if case.impl != "eager":
        err = max_rel_error(impl.outputs(), eager.outputs())
        tol = TOLERANCE[DTYPES[case.dtype]]
        if case.op == "model":
            tol = max(tol, 1e-2)  # logits after 80 layers (TF32 convolutions on a GPU)
        assert err <= tol, f"{case.impl} differs from eager by {err:.2e} (relative to eager's largest value)"
        info["max_rel_error"] = err
    else:
        impl.outputs()  # warm-up
    del eager
    fn = synchronized(impl.run, case.device)
    benchmark.group = case.group
    info.update(op=case.op, shape=list(case.shape), device=case.device, dtype=case.dtype, layout=case.layout,
                mode=case.mode, impl=case.impl, batch=case.batch, threads=torch.get_num_threads(),
                torch=torch.__version__, loadavg=os.getloadavg()[0])
    if case.device == "cuda":
        info["device_name"] = torch.cuda.get_device_name()
    bandwidth = None
    if impl.nbytes is not None:
        bandwidth = request.getfixturevalue("copy_bandwidth")
        info.update(bytes=impl.nbytes, bandwidth_gbs=bandwidth / 1e9, floor_s=impl.nbytes / bandwidth)
    if benchmark.disabled:
        benchmark(fn)
        return
    rounds = rounds_for(fn, request.config.getoption("--bench-min-rounds"), request.config.getoption("--bench-time"))
    if case.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(fn, rounds=rounds)  # warmed up by the check and rounds_for's calls
    if case.device == "cuda":
        info["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    if bandwidth is not None and benchmark.stats is not None:
        info["ratio_to_floor"] = benchmark.stats.stats.median / info["floor_s"]
