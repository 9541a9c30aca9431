"""The frozen inference model (effnet_fast.freeze, every BatchNorm folded into its conv):
the reference's answers, its own copies of the weights, eval only; and the fused model's
eval mode, which computes from the current parameters on every call."""
import copy
import os
import pickle

import pytest
import torch

from effnet_fast import EfficientNet, freeze
from effnet_fast.app.benchmark import calibrate_bn
from effnet_fast.nn import frozen as folded
from effnet_fast.ops.backends import backend_built

from test_model import randomize

pytestmark = pytest.mark.skipif(not backend_built("cpu"), reason="the CPU kernels are not built")


def pair(version="b0", seed=0, channels_last=True, size=64):
    """(reference, fused) copies of one model with random weights and BN affine parameters,
    its BN statistics calibrated on random images (as in a trained model: random statistics
    make the activations of a deep variant grow without bound), in eval mode."""
    torch.manual_seed(seed)
    ref = randomize(EfficientNet(version, num_classes=10), seed)
    calibrate_bn(ref, torch.randn(4, 3, size, size))
    ref.eval()
    fused = copy.deepcopy(ref).set_fused("cpu")
    if channels_last:
        ref, fused = (m.to(memory_format=torch.channels_last) for m in (ref, fused))
    return ref, fused


def image(n=2, size=64, channels_last=True, seed=1):
    x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return x.to(memory_format=torch.channels_last) if channels_last else x


def close(actual, expected, msg=""):
    """float32 agreement through a whole network: folding rounds differently, and deep
    layers amplify it; a wrong or stale weight gives errors of the output's own size."""
    atol = 1e-3 * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, atol=atol, rtol=1e-3, msg=lambda m: f"{msg}{m}")


def frozen_of(model):
    """freeze(model), checked to be a frozen classifier with every BatchNorm folded."""
    out = freeze(model)
    assert isinstance(out, folded.FrozenClassifier) and not out.kept, out.extra_repr()
    return out


@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "nchw"])
@pytest.mark.parametrize("version", ["b0", pytest.param("b3", marks=pytest.mark.slow),
                                     pytest.param("b7", marks=pytest.mark.slow)])
def test_frozen_matches_reference(version, channels_last):
    ref, fused = pair(version, channels_last=channels_last)
    x = image(channels_last=channels_last)
    for model in (ref, fused):
        fast = frozen_of(model)
        with torch.no_grad():
            close(fast(x), ref(x))
            close(fused(x), ref(x))
        with torch.inference_mode():
            close(fast(x), ref(x))
            close(fused(x), ref(x))


@pytest.mark.slow
@pytest.mark.parametrize("version", ["b1", "b2", "b4", "b5", "b6"])
def test_frozen_matches_reference_every_variant(version):
    ref, fused = pair(version)
    x = image(size=48)
    with torch.no_grad():
        close(frozen_of(fused)(x), ref(x))


@pytest.mark.parametrize("pixels", [0, 1 << 30], ids=["gate_in_weights", "scale_then_conv"])
def test_both_projection_paths(monkeypatch, pixels):
    monkeypatch.setattr(folded, "PER_SAMPLE_GEMM_PIXELS", pixels)
    for channels_last in (True, False):
        ref, fused = pair(channels_last=channels_last)
        x = image(channels_last=channels_last)
        with torch.no_grad():
            close(frozen_of(fused)(x), ref(x), f"channels_last={channels_last}: ")


def test_batch_chunks_give_the_same_answer(monkeypatch):
    ref, fused = pair()
    x = image(n=5)
    monkeypatch.setattr(folded, "CHUNK_BYTES", 1)  # every stage one sample at a time
    fast = frozen_of(fused)
    with torch.no_grad():
        plan = folded._chunk_plan(list(fast.stages), x)
        assert {chunks for chunks, _ in plan} == {5}
        close(fast(x), ref(x))


def test_parameter_changed_in_place_is_seen(monkeypatch):
    """The fused model computes from the current parameters; a frozen copy keeps its own."""
    ref, fused = pair()
    x = image()
    with torch.no_grad():
        fast = frozen_of(fused)
        before = fast(x)
        for model in (ref, fused):
            model.stem.conv.weight.mul_(1.5)
            model.blocks[1][0].expand.bn.running_var.mul_(2.0)
            model.blocks[1][0].dw.bn.bias.add_(0.3)
            model.blocks[2][1].project.bn.running_mean.add_(0.2)
            model.head.bn.weight.mul_(0.5)
        close(fused(x), ref(x), "after in-place edits: ")
        fused.load_state_dict(randomize(copy.deepcopy(ref), seed=5).state_dict())
        ref.load_state_dict(fused.state_dict())
        close(fused(x), ref(x), "after load_state_dict: ")
        assert torch.equal(fast(x), before), "the frozen model changed with the model it was frozen from"


def test_eval_adds_nothing_to_state():
    ref, fused = pair()
    keys = list(ref.state_dict())
    with torch.no_grad():
        fused(image())
    assert list(fused.state_dict()) == keys
    copy.deepcopy(fused)
    pickle.loads(pickle.dumps(fused))


def test_frozen_state_dict_round_trip(tmp_path):
    """The documented way to save a frozen model: its state_dict, read with weights_only=True
    into the frozen form of a model of the same architecture."""
    ref, fused = pair()
    x = image()
    fast = frozen_of(fused)
    torch.save(fast.state_dict(), tmp_path / "frozen.pt")
    again = freeze(EfficientNet("b0", num_classes=10))
    again.load_state_dict(torch.load(tmp_path / "frozen.pt", weights_only=True))
    with torch.no_grad():
        close(again(x), ref(x))
        assert torch.equal(pickle.loads(pickle.dumps(fast))(x), fast(x))
        assert torch.equal(copy.deepcopy(fast)(x), fast(x))


def test_train_eval_switching():
    ref, fused = pair()
    x = image(n=4)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt_fused = torch.optim.SGD(fused.parameters(), lr=0.1)
    for step in range(2):
        with torch.no_grad():
            close(fused.eval()(x), ref.eval()(x), f"eval before step {step}: ")
        for model, opt in ((ref, opt_ref), (fused, opt_fused)):
            model.train()
            for m in model.modules():  # deterministic training forward
                if hasattr(m, "p"):
                    m.p = 0.0
            model.dropout.p = 0.0
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        for (name, a), b in zip(ref.state_dict().items(), fused.state_dict().values()):
            close(b, a, f"{name} after step {step}: ")


def test_eval_with_gradients():
    ref, fused = pair()
    x = image()
    x_ref, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref, out_fused = ref(x_ref), fused(x_fused)
    close(out_fused, out_ref)
    out_ref.sum().backward()
    out_fused.sum().backward()
    close(x_fused.grad, x_ref.grad, "input grad: ")
    for (name, a), b in zip(ref.named_parameters(), fused.parameters()):
        close(b.grad, a.grad, f"{name}.grad: ")


def test_compiled_eval_matches_reference():
    ref, fused = pair()
    x = image()
    torch._dynamo.reset()
    compiled = torch.compile(fused, backend="aot_eager")
    with torch.no_grad():
        close(compiled(x), ref(x))


def test_batch_norm_left_in_training_mode():
    ref, fused = pair()
    x = image(n=4)
    for model in (ref, fused):
        model.blocks[1][0].dw.bn.train()  # batch statistics in an otherwise eval model
        model.blocks[2][0].expand.bn.train()
    with torch.no_grad():
        close(fused(x), ref(x))


def test_batch_norm_without_affine_parameters_frozen():
    torch.manual_seed(0)
    ref = EfficientNet("b0", num_classes=10)
    for block in ref.blocks[1]:
        for layer in (block.expand, block.dw, block.project):
            layer.bn = torch.nn.BatchNorm2d(layer.bn.num_features, affine=False)
    calibrate_bn(ref, torch.randn(4, 3, 64, 64))
    ref.eval()
    fused = copy.deepcopy(ref).set_fused("cpu")
    x = image()
    with torch.no_grad():
        close(fused(x), ref(x))
        close(frozen_of(fused)(x), ref(x))


def test_private_onednn_api_is_there():
    """The fast path calls torch.ops.mkldnn._convolution_pointwise, a private API: this
    fails when a torch release drops it (the model then falls back to plain convs)."""
    if torch.backends.mkldnn.is_available():
        assert folded._ONEDNN


def test_without_onednn(monkeypatch):
    monkeypatch.setattr(folded, "_ONEDNN", False)
    ref, fused = pair()
    x = image()
    with torch.no_grad():
        close(frozen_of(fused)(x), ref(x))


def test_stage_replaced_after_a_forward_is_used(monkeypatch):
    ref, fused = pair()
    x = image(n=4)
    monkeypatch.setattr(folded, "CHUNK_BYTES", 1)
    with torch.no_grad():
        fused(x)  # plans the chunks
        for model in (ref, fused):
            model.head = torch.nn.Sequential(model.head, torch.nn.Hardtanh(-0.1, 0.1))
        close(fused(x), ref(x))


# ----------------------------------------------------------------------------- low precision

BF16_ON_ONEDNN = torch.bfloat16 in folded.ONEDNN_DTYPES


def relative_error(actual, expected):
    return ((actual.float() - expected).abs().max() / expected.abs().max()).item()


def autocast_error(ref, x):
    """How far eager bf16 autocast is from float32: the accuracy a bf16 path must keep."""
    with torch.no_grad():
        expected = ref(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return relative_error(ref(x), expected)


def assert_bf16_accuracy(actual, ref, x):
    with torch.no_grad():
        expected = ref(x)
    bound = max(3 * autocast_error(ref, x), 5e-2)  # a wrong or stale weight errs by the logits' own size
    err = relative_error(actual, expected)
    assert err <= bound, f"bf16 output off by {err:.3g} of the largest logit; eager bf16 autocast: bound {bound:.3g}"


@pytest.mark.parametrize("onednn_bf16", [
    pytest.param(True, marks=pytest.mark.skipif(not BF16_ON_ONEDNN, reason="the CPU has no bfloat16 instructions")),
    False], ids=["onednn_bf16", "float32_compute"])
def test_bfloat16_frozen_model(monkeypatch, onednn_bf16):
    """freeze(dtype=bfloat16): float32 inputs answer in float32, bfloat16 inputs in
    bfloat16, within eager autocast's accuracy; without bfloat16 instructions the model
    computes in float32 from its rounded weights."""
    if not onednn_bf16:
        monkeypatch.setattr(folded, "ONEDNN_DTYPES", frozenset({torch.float32}))
    ref, fused = pair()
    x = image(n=4)
    fast = freeze(fused, dtype=torch.bfloat16)
    assert fast.dtype == torch.bfloat16 and all(b.dtype == torch.bfloat16 for b in fast.buffers())
    with torch.no_grad():
        out = fast(x)
        assert out.dtype == torch.float32
        assert_bf16_accuracy(out, ref, x)
        low = fast(x.to(torch.bfloat16))
        assert low.dtype == torch.bfloat16
        assert_bf16_accuracy(low, ref, x)
    assert list(fast._copies) == ([] if onednn_bf16 else [torch.float32])
    if not onednn_bf16:  # the float32 copy holds the bfloat16 weights exactly
        conv = fast._copies[torch.float32].stages[0]
        assert torch.equal(conv.weight, fast.stages[0].weight.float())


@pytest.mark.parametrize("bf16_compute", [True, False], ids=["bf16_compute", "float32_compute"])
def test_frozen_model_under_autocast(monkeypatch, bf16_compute):
    """A float32 frozen model under bf16 autocast answers in bfloat16 as autocast does, by
    a copy of its weights made once (computing in float32 where the CPU has no bfloat16
    instructions); outside autocast it is float32 again."""
    if bf16_compute and not BF16_ON_ONEDNN:  # bfloat16 convs through torch instead of oneDNN
        monkeypatch.setattr(folded, "_ONEDNN", False)
        monkeypatch.setattr(folded, "ONEDNN_DTYPES", frozenset({torch.float32, torch.bfloat16}))
    elif not bf16_compute:
        monkeypatch.setattr(folded, "ONEDNN_DTYPES", frozenset({torch.float32}))
    ref, fused = pair()
    x = image(n=4)
    fast = frozen_of(fused)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fast(x)
            again = fast(x)
        assert out.dtype == torch.bfloat16 and torch.equal(out, again)
        assert_bf16_accuracy(out, ref, x)
        close(fast(x), ref(x))
    assert list(fast._copies) == ([torch.bfloat16] if bf16_compute else [])
    fast.to(torch.float32)
    assert not fast._copies, "a cast copy outlived the weights it was cast from"


def test_model_cast_to_bfloat16_then_frozen():
    """model.to(bfloat16), then freeze: BN folded in float32 from the bf16 parameters."""
    ref, fused = pair()
    x = image(n=4)
    fast = freeze(copy.deepcopy(fused).to(torch.bfloat16))
    assert fast.dtype == torch.bfloat16
    with torch.no_grad():
        assert_bf16_accuracy(fast(x), ref, x)
        assert fast(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_frozen_dtype_errors():
    ref, fused = pair()
    with pytest.raises(TypeError, match="dtype=torch.int8"):
        freeze(fused, dtype=torch.int8)
    fast = frozen_of(fused)
    with pytest.raises(TypeError, match="torch.float32 weights, got a torch.bfloat16 input"):
        fast(image().to(torch.bfloat16))
    with pytest.raises(TypeError, match="torch.bfloat16 weights, got a torch.float64 input"):
        freeze(fused, dtype=torch.bfloat16)(image().double())


def _resident_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads /proc/self/statm")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_memory_flat_over_many_calls(dtype):
    """1,000 calls with alternating batch sizes and a layout change: the resident memory
    after them is what it was after the first round (cached plans, packed weights and
    cast copies are made once), within allocator noise."""
    _, fused = pair()
    fast = freeze(fused, dtype=dtype)
    inputs = [image(n=n, size=32, channels_last=n % 2 == 0) for n in (1, 2, 3)]
    with torch.no_grad():
        for x in inputs * 3:
            fast(x)
        before = _resident_bytes()
        for i in range(1000):
            fast(inputs[i % 3])
    grown = _resident_bytes() - before
    assert grown < 16 << 20, f"resident memory grew by {grown / 2**20:.1f} MiB over 1,000 calls"
    assert len(fast._chunk_plans) <= 3


def test_output_is_an_ordinary_tensor():
    """The frozen model computes in inference mode, but its logits are an ordinary tensor:
    modifiable in place and usable in autograd afterwards (an inference tensor is neither)."""
    frozen = freeze(EfficientNet("b0", num_classes=10).eval())
    logits = frozen(torch.randn(2, 3, 64, 64))
    assert not logits.is_inference() and not logits.requires_grad
    logits.add_(1)
    weight = torch.ones(10, requires_grad=True)
    (logits * weight).sum().backward()
    torch.testing.assert_close(weight.grad, logits.sum(0))
    with torch.inference_mode():
        assert frozen(torch.randn(1, 3, 64, 64)).is_inference()  # the caller's own inference mode holds
