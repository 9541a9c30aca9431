"""`effnet-fast predict` and `effnet-fast export` on a checkpoint of a tiny training run."""
import os

import pytest
import torch

from effnet_fast.app.cli import main, parse
from effnet_fast.app.checkpoint import load_model
from effnet_fast.app.train import train

pytest.importorskip("sklearn")
pytest.importorskip("PIL")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(checkpoint path, training images as float tensors in [0, 1], labels, folder)."""
    folder = tmp_path_factory.mktemp("run")
    out = folder / "ck.pt"
    args, inputs = parse(["train", "--epochs", "1", "--limit", "48", "--batch", "16", "--size", "32", "--workers", "0",
                          "--out", str(out)])
    train(args, inputs, plot=False)
    data = inputs.data.train
    return out, data.images[:4], data.labels[:4], folder


def _save_png(image, path):
    from PIL import Image
    pixels = (image.permute(1, 2, 0) * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(path)
    return (torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)


def _model_top1(checkpoint, image01):
    model, info = load_model(checkpoint)
    mean, std = torch.tensor(info["mean"])[:, None, None], torch.tensor(info["std"])[:, None, None]
    with torch.no_grad():
        probs = model(((image01 - mean) / std)[None]).softmax(1)[0]
    return info["classes"][int(probs.argmax())], float(probs.max())


def test_predict_gives_the_models_class(trained, capsys):
    checkpoint, images, labels, folder = trained
    paths, expected = [], []
    for i, image in enumerate(images[:2]):
        path = folder / f"train{i}.png"
        expected.append(_model_top1(checkpoint, _save_png(image, path)))
        paths.append(str(path))
    main(["predict", *paths, "--weights", str(checkpoint), "--topk", "3"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    for line, path, (name, prob) in zip(lines, paths, expected):
        head, top = line.split(": ", 1)
        assert head == path
        first, p = top.split(", ")[0].split()
        assert first == name and float(p) == pytest.approx(prob, abs=2e-3)
        assert len(top.split(", ")) == 3


@pytest.mark.parametrize("fused", ["cpu", False])
def test_predict_in_bfloat16_gives_the_float32_classes(trained, fused):
    """--amp bf16: a fused model frozen in bfloat16, an unfused one under autocast; the
    top classes and their probabilities as in float32, within bfloat16's rounding."""
    from effnet_fast.app.predict import predict_with
    from effnet_fast.ops.backends import backend_built
    if fused == "cpu" and not backend_built("cpu"):
        pytest.skip("the CPU kernels are not built")
    checkpoint, images, _, folder = trained
    paths = []
    for i, image in enumerate(images):
        paths.append(str(folder / f"bf16_{i}.png"))
        _save_png(image, paths[-1])
    loaded = load_model(checkpoint, fused=fused)
    full, low = (predict_with(loaded, paths, topk=1, amp=amp) for amp in (None, torch.bfloat16))
    for (_, [(name, p)]), (_, [(low_name, low_p)]) in zip(full, low):
        assert low_name == name and low_p == pytest.approx(p, abs=2e-2)


def test_predict_with_a_bare_state_dict(trained, tmp_path, capsys):
    checkpoint, images, _, _ = trained
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    bare = tmp_path / "bare.pt"
    torch.save(ckpt["state_dict"], bare)
    png = tmp_path / "x.png"
    _save_png(images[0], png)
    main(["predict", str(png), "--weights", str(bare), "--topk", "1"])
    assert capsys.readouterr().out.startswith(f"{png}: ")


def test_export_pt2_matches_the_model(trained, tmp_path, capsys):
    checkpoint = trained[0]
    out = tmp_path / "model.pt2"
    main(["export", "--weights", str(checkpoint), "--format", "pt2", "--out", str(out)])
    assert "checked with torch.export.load" in capsys.readouterr().out
    model, _ = load_model(checkpoint)
    x = torch.randn(3, 3, 32, 32)  # another batch size: the batch dimension is dynamic
    with torch.no_grad():
        torch.testing.assert_close(torch.export.load(str(out)).module()(x), model(x), atol=1e-4, rtol=1e-3)
    assert sorted(os.listdir(tmp_path)) == ["model.pt2"]


@pytest.mark.slow  # the exporter takes a while; torch.export is checked in the default run
def test_export_onnx_matches_the_model(trained, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    checkpoint = trained[0]
    out = tmp_path / "model.onnx"
    main(["export", "--weights", str(checkpoint), "--format", "onnx", "--out", str(out)])
    assert "checked with ONNX Runtime" in capsys.readouterr().out
    model, _ = load_model(checkpoint)
    x = torch.randn(3, 3, 32, 32)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(x), atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("argv, names", [
    (["predict", "nope.png", "--weights", "x.pt"], "IMAGE"),
    (["predict", "--weights", "x.pt"], "IMAGE"),
    (["predict", __file__, "--weights", "/no/such.pt"], "--weights"),
    (["predict", __file__, "--weights", __file__, "--topk", "0"], "--topk"),
    (["export", "--weights", "/no/such.pt", "--format", "onnx", "--out", "m.onnx"], "--weights"),
    (["export", "--weights", __file__, "--format", "tflite", "--out", "m.tflite"], "--format"),
    (["export", "--weights", __file__, "--format", "pt2", "--out", "/no/such/dir/m.pt2"], "--out"),
])
def test_bad_values_exit_2_naming_the_option(argv, names, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert names in err and "Traceback" not in err, err


def test_predict_refuses_a_file_that_is_not_weights(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    torch.save({"w": torch.ones(1)}, bad)
    png = tmp_path / "x.png"
    _save_png(torch.zeros(3, 8, 8), png)
    with pytest.raises(SystemExit) as exc:
        main(["predict", str(png), "--weights", str(bad)])
    assert exc.value.code == 2 and "--weights" in capsys.readouterr().err


@pytest.mark.parametrize("source", ["torchvision", "timm"])
def test_predict_preprocesses_as_the_source(tmp_path, source):
    """A non-square image goes through the source's own evaluation transform: shorter side
    resized with the source's interpolation, centre crop, its mean and std, as
    torchvision's weights.transforms() / timm's create_transform compute it."""
    from effnet_fast.app.predict import preprocess
    pixels = (torch.rand(3, 150, 230) * 255).to(torch.uint8)
    path = tmp_path / "wide.png"
    _save_png(pixels.float() / 255, path)
    if source == "torchvision":
        torchvision = pytest.importorskip("torchvision")
        transform = torchvision.models.EfficientNet_V2_S_Weights.IMAGENET1K_V1.transforms()
        info = {"size": 384, "crop_fraction": 1.0, "mean": transform.mean, "std": transform.std,
                "interpolation": transform.interpolation.value}
    else:
        timm = pytest.importorskip("timm")
        cfg = timm.data.resolve_data_config({}, model=timm.create_model("tf_efficientnet_b0"))
        transform = timm.data.create_transform(**cfg)
        info = {"size": cfg["input_size"][-1], "crop_fraction": cfg["crop_pct"], "mean": cfg["mean"],
                "std": cfg["std"], "interpolation": cfg["interpolation"]}
    assert info["interpolation"] == ("bilinear" if source == "torchvision" else "bicubic")  # V2-S's; timm's
    from PIL import Image
    expected = transform(Image.open(path).convert("RGB"))
    x = preprocess([path], info)
    assert x.shape == (1, 3, info["size"], info["size"])
    # PIL's bicubic (the peers on a PIL image) and torch's antialiased bicubic round differently
    assert (x[0] - expected).abs().mean() < 0.02, (x[0] - expected).abs().mean()
    other = {"bilinear": "bicubic", "bicubic": "bilinear"}[info["interpolation"]]
    assert not torch.equal(preprocess([path], {**info, "interpolation": other}), x)  # the setting is used
