"""Synchronised BatchNorm (effnet_fast.distributed.convert_sync_batchnorm): two processes,
each on half of a batch, wrapped in DistributedDataParallel, against one process on the
whole batch: same outputs, same BatchNorm running statistics (every BN of the model),
same parameter and input gradients.

One spawn of two processes (gloo on the loopback) runs every CPU case: fused layers
and the whole model on the 'cpu' and 'reference' backends, negative controls (the
forward or the backward merge switched off must fail the comparison), a group of one
rank (no communication), and the CPU reference-layer error. On a GPU, the 'cuda' and
'triton' backends and the reference layers (nn.SyncBatchNorm) run the same comparison:
NCCL with two GPUs, gloo on CUDA tensors with one."""
import contextlib
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import effnet_fast.ops.batch_norm as batch_norm_ops
from effnet_fast import EfficientNet, convert_sync_batchnorm
from effnet_fast.distributed import SyncBatchNorm2d
from effnet_fast.nn import ConvBNAct, MBConv
from effnet_fast import set_fused
from effnet_fast.ops.backends import _why_unusable

WORLD = 2
BATCH = 4  # BATCH // WORLD per rank
# float64: the two-process run within FLOAT64_TOLERANCE times each tensor's largest
# magnitude of the one-process run (a missing merge errs by 1e-3 and more). The small
# model's BatchNorms (a few values per channel at 32x32) amplify rounding; in float32
# the two-process run must be as close to the float64 result as one-process float32
# runs are (FLOAT32_MARGIN times the larger distance of two of them: the fused and the
# reference layers, which round differently).
FLOAT64_TOLERANCE = 1e-9
FLOAT32_MARGIN = 4.0


def build(kind, fused, dtype, device):
    """The model of a case, same weights for every call: 'layers' is a stem-like
    conv + BN + SiLU, an MBConv block (expand BN + SiLU, depthwise, SE + projection BN)
    and a conv + BN without activation; 'model' is EfficientNet-B0 at 32x32."""
    torch.manual_seed(0)
    if kind == "model":
        model = EfficientNet("b0", num_classes=10, stochastic_depth=0.0, dropout=0.0)
    else:
        model = nn.Sequential(ConvBNAct(3, 16, 3, stride=2), MBConv(16, 16, 4, 3, 1, drop_prob=0.0),
                              ConvBNAct(16, 8, 1, act=False))
    with torch.no_grad():  # BatchNorms away from their initial values, so every term counts
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    if fused:
        set_fused(model, fused)
    return model.to(device, dtype).train()


def batch(kind, dtype, device):
    """Random input (the second half shifted and scaled, so that each rank's statistics
    differ from the whole batch's) and random weights of the loss."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 3, 32, 32, generator=g, dtype=torch.float64)
    x[BATCH // 2:] = x[BATCH // 2:] * 2.0 + 0.75
    out_shape = (BATCH, 10) if kind == "model" else (BATCH, 8, 16, 16)
    w = torch.randn(out_shape, generator=g, dtype=torch.float64)
    return x.to(device, dtype), w.to(device, dtype)


def step(model, x, w, n_total):
    """One forward and backward of loss = sum(out * w) / n_total; returns the output,
    the input gradient, the parameter gradients and the buffers after the step."""
    x = x.clone().requires_grad_()
    out = model(x)
    (out * w).sum().div(n_total).backward()
    module = model.module if isinstance(model, DDP) else model
    grads = {name: p.grad.detach().clone() for name, p in module.named_parameters()}
    buffers = {name: b.detach().clone() for name, b in module.named_buffers()}
    return dict(out=out.detach(), grad_x=x.grad.detach(), grads=grads, buffers=buffers)


def single_process(kind, fused, dtype, device):
    model = build(kind, fused, dtype, device)
    x, w = batch(kind, dtype, device)
    return step(model, x, w, BATCH)


def two_process_step(rank, kind, fused, dtype, device, group=None, wrap=True, evaluate=False):
    model = convert_sync_batchnorm(build(kind, fused, dtype, device), group)
    x, w = batch(kind, dtype, device)
    half = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    # DDP averages the gradients over the ranks: each rank's loss is its share of the mean.
    wrapped = DDP(model, process_group=group) if wrap else model
    result = step(wrapped, x[half], w[half], BATCH // WORLD)
    if wrap:  # the gradient of the averaged loss, as DDP gives the parameters
        result["grad_x"] = result["grad_x"] / WORLD
    if evaluate:
        result.update(evaluate_without_communication(model, x[half]))
    return result


def evaluate_without_communication(model, x):
    """Eval-mode outputs after the step, through the ops with a gradient needed and without
    (no_grad), with every collective of the BatchNorms made to fail."""
    def refuse(*args):
        raise AssertionError("a BatchNorm communicated in eval mode")

    model.eval()
    with patched("merge_batch_stats", refuse), patched("all_reduce_sum", refuse):
        out_ops = model(x.clone().requires_grad_()).detach()
        with torch.no_grad():
            out_folded = model(x)
    return dict(eval_ops=out_ops, eval_folded=out_folded)


@contextlib.contextmanager
def patched(name, replacement):
    """Replace a function of effnet_fast.ops.batch_norm (a negative control)."""
    original = getattr(batch_norm_ops, name)
    setattr(batch_norm_ops, name, replacement)
    try:
        yield
    finally:
        setattr(batch_norm_ops, name, original)


def cpu_reference_errors():
    """The errors for the reference layers on the CPU: at conversion (a gloo group) and,
    for a model converted otherwise, at the first training forward."""
    messages = []
    try:
        convert_sync_batchnorm(build("layers", False, torch.float32, "cpu"))
    except RuntimeError as exc:
        messages.append(str(exc))
    bn = SyncBatchNorm2d(4).train()
    try:
        bn(torch.randn(2, 4, 3, 3))
    except RuntimeError as exc:
        messages.append(str(exc))
    bn.eval()(torch.randn(2, 4, 3, 3))  # eval: no communication, runs
    return messages


def _worker(rank, port, cases, out_dir, backend_name, checks):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if torch.cuda.is_available():
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(backend_name, rank=rank, world_size=WORLD)
    results, timings = {}, {}
    for case in cases:
        kind, fused, dtype, device = case
        start = time.perf_counter()
        results[case] = two_process_step(rank, kind, fused, dtype, device)
        timings[case] = time.perf_counter() - start
    if "controls" in checks:
        case = ("layers", "cpu", torch.float64, "cpu")
        # The forward merge, then the backward all-reduce, switched off.
        with patched("merge_batch_stats", lambda mean, var, count, group: (
                mean, var, mean.new_full((), count, dtype=torch.float64))):
            results["no forward merge"] = two_process_step(rank, *case)
        with patched("all_reduce_sum", lambda t, group: t.clone()):
            results["no backward all-reduce"] = two_process_step(rank, *case)
    if "eval" in checks:
        results["eval"] = two_process_step(rank, "layers", "cpu", torch.float64, "cpu", evaluate=True)
    if "one rank" in checks:
        # A group of one rank: no communication, the rank's half as one process computes it.
        groups = [dist.new_group([r]) for r in range(WORLD)]
        case = ("layers", "cpu", torch.float64, "cpu")
        results["one rank"] = two_process_step(rank, *case, group=groups[rank], wrap=False)
        model = build("layers", "cpu", torch.float64, "cpu")
        x, w = batch("layers", torch.float64, "cpu")
        half = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        results["one rank, unconverted"] = step(model, x[half], w[half], BATCH // WORLD)
    if "errors" in checks:
        results["errors"] = cpu_reference_errors()
    if "compile" in checks:
        # torch.compile(fullgraph=True) keeps the collectives (the backward's is an op).
        torch._dynamo.reset()
        model = convert_sync_batchnorm(build("layers", "cpu", torch.float64, "cpu"))
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        x, w = batch("layers", torch.float64, "cpu")
        half = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        result = step(compiled, x[half], w[half], BATCH // WORLD)
        result["grads"] = {name: p.grad for name, p in model.named_parameters()}
        result["buffers"] = {name: b for name, b in model.named_buffers()}
        results["compiled"] = result
        results["eager"] = two_process_step(rank, "layers", "cpu", torch.float64, "cpu", wrap=False)
    results["timings"] = timings
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(tmp_path, cases, backend_name="gloo", checks=()):
    mp.spawn(_worker, args=(free_port(), cases, str(tmp_path), backend_name, checks), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def differences(ranks, ref, relative=False):
    """Max abs difference of each compared quantity, two processes against one; relative:
    divided by the largest magnitude of the one-process tensor."""
    def diff(got, want):
        d = (got.double() - want.double()).abs().max().item()
        return d / max(want.double().abs().max().item(), 1e-3) if relative else d

    diffs = {"out": diff(torch.cat([r["out"] for r in ranks]), ref["out"]),
             "grad_x": diff(torch.cat([r["grad_x"] for r in ranks]), ref["grad_x"])}
    for r in ranks:  # DDP leaves the same averaged gradients and (synchronised) buffers on every rank
        for name, g in ref["grads"].items():
            diffs[f"grad {name}"] = max(diffs.get(f"grad {name}", 0.0), diff(r["grads"][name], g))
        for name, b in ref["buffers"].items():
            diffs[f"buffer {name}"] = max(diffs.get(f"buffer {name}", 0.0), diff(r["buffers"][name], b))
    return diffs


def assert_close_to_scale(got, want, label):
    atol = FLOAT64_TOLERANCE * max(want.abs().max().item(), 1e-3)
    torch.testing.assert_close(got, want, atol=atol, rtol=0, msg=lambda m: f"{label}: {m}")


def assert_matches(ranks, ref, label):
    """float64: outputs, input gradients, and on every rank every parameter gradient and buffer."""
    assert_close_to_scale(torch.cat([r["out"] for r in ranks]), ref["out"], f"{label}, output")
    assert_close_to_scale(torch.cat([r["grad_x"] for r in ranks]), ref["grad_x"], f"{label}, input gradient")
    assert set(ranks[0]["buffers"]) == set(ref["buffers"])
    assert any(name.endswith("running_var") for name in ref["buffers"])
    for rank, r in enumerate(ranks):
        for name, g in ref["grads"].items():
            assert_close_to_scale(r["grads"][name], g, f"{label}, rank {rank}, gradient of {name}")
        for name, b in ref["buffers"].items():
            if b.is_floating_point():
                assert_close_to_scale(r["buffers"][name], b, f"{label}, rank {rank}, {name}")
            else:
                assert torch.equal(r["buffers"][name], b), f"{label}, rank {rank}, {name}"


def as_one_list(ranks):
    """The two ranks' results as one result on the whole batch (gradients and buffers
    are the same on both ranks, checked by assert_matches for float64)."""
    return dict(out=torch.cat([r["out"] for r in ranks]), grad_x=torch.cat([r["grad_x"] for r in ranks]),
                grads=ranks[0]["grads"], buffers=ranks[0]["buffers"])


def assert_as_accurate(ranks, one, other, exact, label):
    """float32: every compared tensor of the two-process run within FLOAT32_MARGIN times
    the larger distance of the one-process runs `one` and `other` to the float64 run
    `exact` (plus 1e-6 of its scale)."""
    two = as_one_list(ranks)
    pairs = [("output", two["out"], one["out"], other["out"], exact["out"]),
             ("input gradient", two["grad_x"], one["grad_x"], other["grad_x"], exact["grad_x"])]
    pairs += [(f"gradient of {n}", two["grads"][n], one["grads"][n], other["grads"][n], exact["grads"][n])
              for n in exact["grads"]]
    pairs += [(n, two["buffers"][n], one["buffers"][n], other["buffers"][n], exact["buffers"][n])
              for n in exact["buffers"] if exact["buffers"][n].is_floating_point()]
    for name, got, one_t, other_t, want in pairs:
        err_two = (got.double() - want).abs().max().item()
        err_one = max((one_t.double() - want).abs().max().item(), (other_t.double() - want).abs().max().item())
        bound = FLOAT32_MARGIN * err_one + 1e-6 * want.abs().max().item()
        assert err_two <= bound, f"{label}, {name}: two processes {err_two:.3g} from float64, one process {err_one:.3g}"
    for name in exact["buffers"]:
        if not exact["buffers"][name].is_floating_point():
            assert torch.equal(two["buffers"][name], one["buffers"][name]), name


def report(label, ranks, ref):
    for relative in (False, True):
        diffs = differences(ranks, ref, relative)
        worst = {kind: max((v for k, v in diffs.items() if k.startswith(kind)), default=0.0)
                 for kind in ("out", "grad_x", "grad ", "buffer ")}
        print(f"{label}: max |two processes - one process|{' / scale' if relative else ''}: "
              + ", ".join(f"{k.strip()} {v:.2e}" for k, v in worst.items()))


def check_case(case, results):
    ref = single_process(*case)
    report("-".join(map(str, case)), results, ref)
    if case[2] == torch.float64:
        assert_matches(results, ref, str(case))
    else:
        # float64 through the reference layers (Triton and CUDA kernels do not run float64)
        assert_as_accurate(results, ref, single_process(case[0], False, case[2], case[3]),
                           single_process(case[0], False, torch.float64, case[3]), str(case))


# (kind, fused, dtype, device); the whole model once in the default run.
CPU_CASES = [("layers", "cpu", torch.float64, "cpu"), ("layers", "reference", torch.float64, "cpu"),
             ("layers", "cpu", torch.float32, "cpu"), ("model", "cpu", torch.float64, "cpu")]
SLOW_CPU_CASES = [("model", "reference", torch.float64, "cpu"), ("model", "cpu", torch.float32, "cpu"),
                  ("model", "reference", torch.float32, "cpu")]


def usable_cases(cases):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    usable = [c for c in cases if _why_unusable(c[1], torch.device("cpu")) is None]
    if not usable:
        pytest.skip(f"no CPU backend usable: {_why_unusable('cpu', torch.device('cpu'))}")
    return usable


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """One spawn of two processes for every default CPU check."""
    usable = usable_cases(CPU_CASES)
    return usable, spawn(tmp_path_factory.mktemp("sync_bn"), usable, checks=("controls", "eval", "one rank", "errors"))


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: f"{c[0]}-{c[1]}-{str(c[2])[6:]}")
def test_two_processes_match_one(cpu_run, case):
    cases, ranks = cpu_run
    if case not in cases:
        pytest.skip(f"backend {case[1]!r}: {_why_unusable(case[1], torch.device('cpu'))}")
    check_case(case, [r[case] for r in ranks])


@pytest.mark.slow
def test_two_processes_match_one_whole_model(tmp_path):
    """The whole model on the reference kernel table, and in float32; the layers under
    torch.compile against eager, both synchronised."""
    usable = usable_cases(SLOW_CPU_CASES)
    compile_check = _why_unusable("cpu", torch.device("cpu")) is None
    ranks = spawn(tmp_path, usable, checks=("compile",) if compile_check else ())
    for case in usable:
        check_case(case, [r[case] for r in ranks])
    for r in ranks if compile_check else ():
        got, want = r["compiled"], r["eager"]
        torch.testing.assert_close(got["out"], want["out"], atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(got["grad_x"], want["grad_x"], atol=1e-12, rtol=1e-12)
        for key in ("grads", "buffers"):
            for name in want[key]:
                torch.testing.assert_close(got[key][name], want[key][name], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("control", ["no forward merge", "no backward all-reduce"])
def test_without_the_sync_the_comparison_fails(cpu_run, control):
    """The comparison sees a missing merge: these runs must differ from one process."""
    cases, ranks = cpu_run
    if ("layers", "cpu", torch.float64, "cpu") not in cases:
        pytest.skip("backend 'cpu' not built")
    ref = single_process("layers", "cpu", torch.float64, "cpu")
    results = [r[control] for r in ranks]
    report(control, results, ref)
    diffs = differences(results, ref)
    assert diffs["grad_x"] > 1e-3, diffs
    if control == "no forward merge":
        assert diffs["out"] > 1e-3 and max(v for k, v in diffs.items() if k.startswith("buffer")) > 1e-3
    else:  # forward right, input gradients wrong
        assert diffs["out"] < 1e-10
    with pytest.raises(AssertionError):
        assert_matches(results, ref, control)


def test_eval_mode_does_not_communicate(cpu_run):
    """After a synchronised step, eval mode uses the (equal) running statistics on each
    rank without a collective, through the ops and through the folded path."""
    cases, ranks = cpu_run
    if ("layers", "cpu", torch.float64, "cpu") not in cases:
        pytest.skip("backend 'cpu' not built")
    model = build("layers", "cpu", torch.float64, "cpu")
    x, w = batch("layers", torch.float64, "cpu")
    step(model, x, w, BATCH)
    with torch.no_grad():
        want = model.eval()(x)
    for key in ("eval_ops", "eval_folded"):
        got = torch.cat([r["eval"][key] for r in ranks])
        assert_close_to_scale(got, want, key)


def test_group_of_one_rank_is_plain_batchnorm(cpu_run):
    cases, ranks = cpu_run
    if ("layers", "cpu", torch.float64, "cpu") not in cases:
        pytest.skip("backend 'cpu' not built")
    for r in ranks:
        got, want = r["one rank"], r["one rank, unconverted"]
        for key in ("out", "grad_x"):
            torch.testing.assert_close(got[key], want[key], atol=0, rtol=0)
        for key in ("grads", "buffers"):
            for name in want[key]:
                torch.testing.assert_close(got[key][name], want[key][name], atol=0, rtol=0)


def test_cpu_reference_layers_raise(cpu_run):
    _, ranks = cpu_run
    messages = ranks[0]["errors"]
    assert len(messages) == 2, messages
    for message in messages:
        assert "needs the fused layers" in message and "fused=True" in message


def test_converted_without_process_group_is_unchanged():
    """Without torch.distributed initialised the converted model computes what it did."""
    assert not dist.is_initialized()
    case = ("layers", "cpu", torch.float64, "cpu")
    if _why_unusable("cpu", torch.device("cpu")):
        case = ("layers", "reference", torch.float64, "cpu")
    model = build(*case)
    keys = list(model.state_dict())
    converted = convert_sync_batchnorm(build(*case))
    assert list(converted.state_dict()) == keys
    assert sum(isinstance(m, SyncBatchNorm2d) for m in converted.modules()) == 5
    x, w = batch("layers", torch.float64, "cpu")
    want, got = step(model, x, w, BATCH), step(converted, x, w, BATCH)
    torch.testing.assert_close(got["out"], want["out"], atol=0, rtol=0)
    for name in want["grads"]:
        torch.testing.assert_close(got["grads"][name], want["grads"][name], atol=0, rtol=0)
    for name in want["buffers"]:
        torch.testing.assert_close(got["buffers"][name], want["buffers"][name], atol=0, rtol=0)
    converted.eval()  # eval reads the converted BatchNorms' running statistics
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), atol=1e-12, rtol=1e-12)


def test_sync_batch_norm_op_without_group():
    """The projection BatchNorm's op with no group is nn.BatchNorm2d in training mode:
    output, gradients (gradcheck) and the statistics it returns; opcheck."""
    torch.manual_seed(5)
    y = (torch.randn(2, 3, 3, 4, dtype=torch.float64) * 2 + 0.5).requires_grad_()
    w = torch.rand(3, dtype=torch.float64).add(0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    out, mean, var, count = batch_norm_ops.sync_batch_norm_op(y, w, b, 1e-5, "")
    ref = torch.nn.functional.batch_norm(y, None, None, w, b, True, 0.0, 1e-5)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(mean, y.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(var, y.var(dim=(0, 2, 3), unbiased=False))
    assert count.item() == 2 * 3 * 4
    assert torch.autograd.gradcheck(lambda *a: batch_norm_ops.sync_batch_norm_op(*a, 1e-5, "")[0], (y, w, b))
    torch.library.opcheck(torch.ops.effnet_fast.sync_batch_norm.default, (y.float(), w.float(), b.float(), 1e-5, ""))


GPU_CASES = [("model", backend, torch.float32, "cuda") for backend in ("cuda", "triton", False)]


def test_two_processes_match_one_gpu(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the GPU backends and nn.SyncBatchNorm are tested on a GPU only")
    # NCCL needs a GPU per rank; with one GPU both ranks share it through gloo (the fused
    # layers' collectives; nn.SyncBatchNorm of the reference layers is left to NCCL).
    backend_name = "nccl" if torch.cuda.device_count() >= WORLD and dist.is_nccl_available() else "gloo"
    usable = [c for c in GPU_CASES if (c[1] is False and backend_name == "nccl")
              or (c[1] and _why_unusable(c[1], torch.device("cuda")) is None)]
    if not usable:
        pytest.skip("no GPU backend built")
    ranks = spawn(tmp_path, usable, backend_name)
    for case in usable:
        check_case(case, [r[case] for r in ranks])
