"""A fused model in eval mode computes from what the model holds now, whatever changed
it: each case once gave a silently stale or wrong answer when eval mode folded BatchNorm
through a cache. The reference is the same model with the fused layers switched off
(set_fused(False)), or an identical reference model given the same changes."""
import copy

import pytest
import torch
import torch.nn.utils.prune
from torch import nn

from effnet_fast import EfficientNet, freeze, patch
from effnet_fast.app.benchmark import calibrate_bn
from effnet_fast.ops.backends import backend_built

from test_model import randomize

pytestmark = pytest.mark.skipif(not backend_built("cpu"), reason="the CPU kernels are not built")


def calibrated(seed=0):
    torch.manual_seed(seed)
    model = randomize(EfficientNet("b0", num_classes=10), seed)
    return calibrate_bn(model, torch.randn(4, 3, 64, 64)).eval()


def image(n=2, seed=1):
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def close(actual, expected, msg=""):
    atol = 1e-3 * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, atol=atol, rtol=1e-3, msg=lambda m: f"{msg}{m}")


def unfused_output(model, x):
    """model(x) in eval mode with the reference layers, the model left as it was."""
    reference = copy.deepcopy(model).set_fused(False).eval()
    with torch.no_grad():
        return reference(x)


def eval_output(model, x):
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("opt", ["adamw", "adam", "sgd"])
def test_fused_optimizer_step_then_eval(opt):
    """Fused optimizers update parameters without bumping their version counters."""
    model = calibrated().set_fused("cpu")
    x = image()
    eval_output(model, x)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = {"adamw": lambda: torch.optim.AdamW(params, lr=0.05, fused=True),
                 "adam": lambda: torch.optim.Adam(params, lr=0.05, fused=True),
                 "sgd": lambda: torch.optim.SGD(params, lr=1e-4, momentum=0.9, fused=True)}[opt]()
    for _ in range(2):  # fine-tuning with BatchNorm frozen in eval mode
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    close(eval_output(model, x), unfused_output(model, x))


def test_batch_norm_recalibrated_between_evaluations():
    """The projection BatchNorms (nn.BatchNorm2d) update their statistics in train-mode
    forwards under no_grad without bumping the version counters the cache looked at."""
    model = calibrated().set_fused("cpu")
    x = image()
    before = eval_output(model, x)
    model.train()
    with torch.no_grad():  # recalibration as train-mode forwards (nn.BatchNorm2d updates in its kernel)
        for _ in range(3):
            model(torch.randn(4, 3, 64, 64) * 2 + 0.5)
    after = eval_output(model, x)
    close(after, unfused_output(model, x))
    assert not torch.allclose(after, before, atol=1e-3)


def test_eps_changed_after_an_evaluation():
    model = calibrated().set_fused("cpu")
    x = image()
    eval_output(model, x)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = 0.5
    close(eval_output(model, x), unfused_output(model, x))


def test_momentum_changed_then_training_step_then_eval():
    model = calibrated().set_fused("cpu")
    reference = copy.deepcopy(model).set_fused(False)
    x = image(n=4)
    eval_output(model, x)
    for m in (model, reference):
        for bn in (b for b in m.modules() if isinstance(b, nn.BatchNorm2d)):
            bn.momentum = 0.9
        m.train()
        m.dropout.p = 0.0
        for block in m.mbconv_blocks():
            block.drop_path = nn.Identity()
        with torch.no_grad():
            m(x)
    close(eval_output(model, x), eval_output(reference, x))


def test_conv_with_bias_before_batch_norm():
    """A head conv replaced by a biased nn.Conv2d: the bias counts, fused and frozen."""
    model = calibrated()
    conv = model.head.conv
    biased = nn.Conv2d(conv.in_channels, conv.out_channels, 1, bias=True)
    with torch.no_grad():
        biased.weight.copy_(conv.weight)
        biased.bias.normal_(0, 1.0)
    model.head.conv = biased
    x = image()
    expected = eval_output(model, x)
    close(eval_output(freeze(model), x), expected, "frozen: ")
    close(eval_output(model.set_fused("cpu"), x), expected, "fused: ")


def test_model_in_training_mode_called_inside_another_models_forward():
    """Feature distillation / monitoring: a training-mode model run from a forward hook of a
    fused model in eval uses batch statistics and updates its running statistics."""
    teacher = calibrated(seed=0).set_fused("cpu")
    student = calibrated(seed=1).set_fused("cpu").train()
    student.dropout.p = 0.0
    for block in student.mbconv_blocks():
        block.drop_path = nn.Identity()
    reference = copy.deepcopy(student).set_fused(False)
    x = image(n=4)
    seen = {}

    def run_student(module, inputs, output):
        seen["out"] = student(x)

    teacher.blocks[2].register_forward_hook(run_student)
    with torch.no_grad():
        teacher.eval()(x)
        expected = reference(x)
    close(seen["out"], expected)
    for (name, a), b in zip(reference.named_buffers(), student.buffers()):
        close(b, a, f"{name}: ")


def test_inference_tensors():
    """A model built (and moved) under torch.inference_mode()."""
    with torch.inference_mode():
        model = calibrated().set_fused("cpu").eval()
        x = image()
        close(model(x), copy.deepcopy(model).set_fused(False)(x))
        close(freeze(model)(x), model(x))


def test_state_changes_after_freezing_stay_in_the_model():
    """The frozen model keeps its own weights through the source model's load_state_dict,
    .to(dtype) and .to(memory_format); it moves and converts itself when asked."""
    model = calibrated().set_fused("cpu")
    x = image()
    frozen = freeze(model)
    expected = eval_output(model, x)
    model.load_state_dict(randomize(calibrated(seed=3), seed=3).state_dict())
    model.to(torch.float64).to(memory_format=torch.channels_last)
    close(eval_output(frozen, x), expected, "after the model changed: ")
    close(eval_output(frozen.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)),
          expected, "frozen, channels_last: ")
    close(eval_output(frozen.to(torch.float64), x.double()).float(), expected, "frozen in float64: ")
    with pytest.raises(TypeError, match="float64 weights, got a torch.float32 input"):
        eval_output(frozen, x)


def test_frozen_model_refuses_training_and_gradients():
    frozen = freeze(calibrated())
    assert not any(p.requires_grad for p in frozen.parameters())
    with pytest.raises(RuntimeError, match="inference only"):
        frozen.train()
    with pytest.raises(RuntimeError, match="requires grad"):
        frozen(image().requires_grad_())
    frozen.eval()  # allowed
    assert "49 BatchNorms folded" in repr(frozen)


def test_batch_norm_without_running_statistics_is_kept_and_named():
    model = calibrated()
    block = model.blocks[1][0]
    block.dw.bn = nn.BatchNorm2d(block.dw.bn.num_features, track_running_stats=False)
    frozen = freeze(model)
    assert any(name.startswith("blocks.1.0") for name in frozen.kept), frozen.kept
    x = image()
    close(eval_output(frozen, x), eval_output(model, x))


# -- patch(): surgery after patching ----------------------------------------------------

def torchvision_pair():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.efficientnet_b0(num_classes=10)
    calibrate_bn(model, torch.randn(4, 3, 64, 64))
    return model.eval(), copy.deepcopy(model).eval()


def test_patched_block_reads_its_current_children():
    plain, patched = torchvision_pair()
    patch(patched, "cpu")
    x = image()
    eval_output(patched, x)
    for model in (plain, patched):
        torch.manual_seed(5)
        block = model.features[2][0].block
        new = nn.Conv2d(block[1][0].in_channels, block[1][0].out_channels, 3, 2, 1,
                        groups=block[1][0].groups, bias=False)
        block[1][0] = new                       # a new depthwise conv
        for parent in model.modules():          # every SiLU replaced by Hardswish
            for name, child in parent.named_children():
                if isinstance(child, nn.SiLU):
                    setattr(parent, name, nn.Hardswish())
        model.features[2][1].use_res_connect = False
    close(eval_output(patched, x), eval_output(plain, x))


# -- hooks on the modules inside fused and patched blocks -------------------------------

def hooked_pair(kind):
    """(reference, fused) B0s with the same hook of `kind` on block 1.0's depthwise conv."""
    reference = calibrated()
    fused = copy.deepcopy(reference).set_fused("cpu")
    calls = {"reference": [], "fused": []}
    for name, model in (("reference", reference), ("fused", fused)):
        conv = model.blocks[1][0].dw.conv
        torch.manual_seed(0)  # spectral_norm's random start
        if kind == "forward":
            conv.register_forward_hook(lambda m, i, o, log=calls[name]: log.append(o.detach().clone()))
        elif kind == "pre-forward":
            conv.register_forward_pre_hook(lambda m, i, log=calls[name]: log.append(i[0].detach().clone()))
        elif kind == "prune":
            torch.nn.utils.prune.l1_unstructured(conv, "weight", amount=0.5)
        elif kind == "weight_norm":
            torch.nn.utils.parametrizations.weight_norm(conv)
        elif kind == "spectral_norm":
            torch.nn.utils.spectral_norm(conv)
    return reference, fused, calls


@pytest.mark.parametrize("kind", ["forward", "pre-forward", "prune", "weight_norm", "spectral_norm"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_hooks_on_inner_modules_fire(kind, mode):
    reference, fused, calls = hooked_pair(kind)
    x = image(n=4)
    if kind == "prune":  # change the pruned weights after the first call: hooks recompute them
        eval_output(fused, x)
        eval_output(reference, x)
    outs = {}
    for name, model in (("reference", reference), ("fused", fused)):
        model.train(mode == "train")
        model.dropout.p = 0.0
        for block in model.mbconv_blocks():
            block.drop_path = nn.Identity()
        with torch.no_grad():
            if kind == "prune":
                model.blocks[1][0].dw.conv.weight_orig.mul_(-1.5)
            outs[name] = model(x)
    close(outs["fused"], outs["reference"])
    if kind in ("forward", "pre-forward"):
        assert len(calls["fused"]) == len(calls["reference"]) >= 1
        close(calls["fused"][-1], calls["reference"][-1], "what the hook saw: ")


def test_global_forward_hook_sees_every_module():
    reference = calibrated()
    fused = copy.deepcopy(reference).set_fused("cpu")
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: seen.append(type(m).__name__))
    try:
        x = image()
        expected = eval_output(reference, x)
        count = len(seen)
        close(eval_output(fused, x), expected)
    finally:
        handle.remove()
    assert seen.count("Conv2d") == 2 * seen[:count].count("Conv2d") > 0


def test_hook_in_a_patched_block_fires():
    plain, patched = torchvision_pair()
    patch(patched, "cpu")
    calls = {"plain": [], "patched": []}
    for name, model in (("plain", plain), ("patched", patched)):
        model.features[2][0].block[1][0].register_forward_hook(
            lambda m, i, o, log=calls[name]: log.append(o.detach().clone()))
    x = image()
    close(eval_output(patched, x), eval_output(plain, x))
    assert len(calls["patched"]) == 1
    close(calls["patched"][0], calls["plain"][0], "what the hook saw: ")
