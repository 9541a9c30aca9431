"""`effnet-fast export --weights PATH --format onnx|pt2 --out FILE`.

Always from the reference (unfused) layers of the same weights: the fused kernels are
custom ops that ONNX and other runtimes do not know. The file is written beside FILE,
loaded back and run (ONNX Runtime, else ONNX's reference evaluator; torch.export.load
for .pt2), its output compared with the model's, and only then renamed to FILE."""
import contextlib
import functools
import io
import os
import tempfile

import torch

from .args import HelpFormatter, positive_int
from .checkpoint import check_writable, load_model

FORMATS = ("onnx", "pt2")


class ExportMismatch(RuntimeError):
    pass


def _max_error(a, b):
    a, b = torch.as_tensor(a).float(), torch.as_tensor(b).float()
    return (a - b).abs().max().item(), max(1e-6, b.abs().max().item())


def export_onnx(model, x, path, dynamic_batch=True):
    batch = torch.export.Dim("batch", min=1, max=4096) if dynamic_batch else None
    dynamic = {"x": {0: batch}} if dynamic_batch else None
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink):  # the exporter's progress lines
        torch.onnx.export(model, (x,), path, dynamo=True, input_names=["x"], output_names=["logits"],
                          dynamic_shapes=dynamic, external_data=False)


def run_onnx(path, x):
    """(output, runtime name) of the ONNX file at `path` on input `x`."""
    try:
        import onnxruntime as ort
    except ImportError:
        ort = None
    if ort is not None:
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return session.run(None, {name: x.numpy()})[0], f"ONNX Runtime {ort.__version__}"
    import onnx
    from onnx.reference import ReferenceEvaluator
    model = onnx.load(path)
    onnx.checker.check_model(model)
    session = ReferenceEvaluator(model)
    return session.run(None, {model.graph.input[0].name: x.numpy()})[0], "onnx.reference (ONNX Runtime not installed)"


def export_pt2(model, x, path, dynamic_batch=True):
    dynamic = {"x": {0: torch.export.Dim("batch", min=1, max=4096)}} if dynamic_batch else None
    program = torch.export.export(model, (x,), dynamic_shapes=dynamic)
    torch.export.save(program, path)


def run_pt2(path, x):
    program = torch.export.load(path)
    return program.module()(x), "torch.export.load"


def export(weights, fmt, out, batch=2, size=None, dynamic_batch=True, atol=1e-4, rtol=1e-3):
    """Export the model of `weights` to `out`, verified; returns a dict with the
    runtime that checked it and the largest difference from the model's output."""
    return export_loaded(load_model(weights, fused=False), fmt, out, batch, size, dynamic_batch, atol, rtol)


def export_loaded(loaded, fmt, out, batch=2, size=None, dynamic_batch=True, atol=1e-4, rtol=1e-3):
    """export() of the (model, info) pair load_model(..., fused=False) returned: the
    reference path, always."""
    model, info = loaded
    model.eval()
    size = size or info["size"]
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x)
    directory = os.path.dirname(os.path.abspath(out))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(out)}.", suffix=f".{fmt}", dir=directory)
    os.close(fd)
    try:
        if fmt == "onnx":
            export_onnx(model, x, tmp, dynamic_batch)
            got, runtime = run_onnx(tmp, x)
        else:
            export_pt2(model, x, tmp, dynamic_batch)
            with torch.no_grad():
                got, runtime = run_pt2(tmp, x)
        err, scale = _max_error(got, expected)
        if err > atol + rtol * scale:
            raise ExportMismatch(f"the exported {fmt} output differs from the model's by {err:.3g} "
                                 f"(allowed {atol + rtol * scale:.3g}); not written to {out}")
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return {"out": out, "format": fmt, "runtime": runtime, "max_abs_diff": err, "size": size,
            "version": info["version"], "num_classes": info["num_classes"], "ema": info["ema"]}


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def add_command(sub):
    """The `export` subcommand of the command line."""
    p = sub.add_parser("export", formatter_class=HelpFormatter,
                       help="export a checkpoint to ONNX or a torch.export program (.pt2), verified",
                       description="From the reference (unfused) layers of the weights; the exported file is "
                                   "loaded back and its output\ncompared with the model's before it is written.")
    p.add_argument("--weights", required=True, metavar="PATH", help="checkpoint of `effnet-fast train` or a state "
                   "dict of ours")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, metavar="FILE")
    p.add_argument("--size", type=positive_int, help="input size (default: the checkpoint's training size)")
    p.add_argument("--static-batch", action="store_true", help="fix the batch size of the exported model (the batch dimension is dynamic otherwise)")
    p.set_defaults(func=run_command, check=functools.partial(check_args, p))
    return p


def check_args(parser, args):
    """Post-parse validation (parser.error: exit code 2); returns the loaded (model, info)."""
    if not os.path.isfile(args.weights):
        parser.error(f"--weights {args.weights}: no such file")
    try:
        loaded = load_model(args.weights, fused=False)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        parser.error(f"--weights {args.weights}: {exc}")
    try:
        check_writable(args.out)
    except OSError as exc:
        parser.error(f"--out: {exc}")
    if args.format == "onnx":
        try:
            import onnx  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError as exc:
            parser.error(f"--format onnx needs onnx and onnxscript (pip install onnx onnxscript onnxruntime): {exc}")
    return loaded


def run_command(args, loaded):
    try:
        result = export_loaded(loaded, args.format, args.out, size=args.size, dynamic_batch=not args.static_batch)
    except ExportMismatch as exc:
        raise SystemExit(f"effnet-fast export: {exc}") from exc
    print(f"exported {result['version']} ({result['num_classes']} classes{', EMA weights' if result['ema'] else ''}, "
          f"reference layers, input {result['size']}x{result['size']}) to {result['out']} ({result['format']}); "
          f"checked with {result['runtime']}: largest difference from the model {result['max_abs_diff']:.2e}")
    return result
