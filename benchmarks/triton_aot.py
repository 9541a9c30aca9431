"""Compile every Triton kernel of effnet_fast.kernels ahead of time for real GPUs (no GPU
needed) and report registers, spills and shared memory per kernel, config and dtype.

Each kernel is compiled for every autotuning config (the GPU list, as a GPU run would
autotune over), every constexpr variant the launchers use (K, CHANNELS_LAST, PRODUCT,
HAS_BIAS) and every dtype it is used with (float32, float16, bfloat16 data; the float32
statistics and partial buffers stay float32), for sm_80 and sm_90, with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`. The arguments are
specialised as the launchers' calls are at run time: pointers 16-byte aligned, the
innermost stride of each tensor equal to 1 (NCHW: the W/pixel stride, channels_last: the
channel stride), sizes and the other strides generic. Resources come from the compiled
cubin (`cuobjdump --dump-resource-usage`: registers, stack, local memory) and from
`ptxas -v` on the PTX (spill stores and loads), both the tools bundled with Triton; the
shared memory is Triton's own (metadata.shared, dynamic).

Must run without TRITON_INTERPRET=1 (under it triton.jit gives interpreter functions);
tests/test_triton_aot.py and benchmarks/report.py run it as a subprocess.

  python benchmarks/triton_aot.py [--quick] [--json out.json] [--markdown out.md] [--jobs 2]
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

ARCHS = (90, 80)
DATA_DTYPES = ("fp32", "fp16", "bf16")
TORCH_DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

# Per kernel function (module, name): the pointer arguments holding data in the layer's
# dtype (the others are float32 buffers), the constexpr variants the launchers pass, and
# for the kernels launched directly (not autotuned) the one config they launch with.
KERNELS = {
    ("dwconv_bn_silu", "_stats_kernel"): dict(data={"x_ptr", "w_ptr"}, variants={"K": (3, 5)}),
    ("dwconv_bn_silu", "_forward_kernel"): dict(data={"x_ptr", "w_ptr", "out_ptr"}, variants={"K": (3, 5)}),
    ("dwconv_bn_silu", "_backward_reduce_kernel"): dict(data={"g_ptr", "x_ptr", "w_ptr"}, variants={"K": (3, 5)}),
    ("dwconv_bn_silu", "_backward_dy_kernel"): dict(data={"g_ptr", "x_ptr", "w_ptr", "dy_ptr"},
                                                    variants={"K": (3, 5)}),
    ("dwconv_bn_silu", "_grad_input_kernel"): dict(data={"dy_ptr", "w_ptr", "gx_ptr"}, variants={"K": (3, 5)}),
    ("dwconv_bn_silu", "_merge_stats_kernel"): dict(data=set(), variants={},
                                                    launch=dict(BLOCK_G=16, BLOCK_C=64, num_warps=4)),
    ("bn_silu", "_stats_kernel"): dict(data={"y_ptr"}, variants={}),
    ("bn_silu", "_backward_reduce_kernel"): dict(data={"g_ptr", "y_ptr"}, variants={}),
    ("bn_silu", "_forward_kernel"): dict(data={"y_ptr", "out_ptr"}, variants={"CHANNELS_LAST": (False, True)}),
    ("bn_silu", "_backward_kernel"): dict(data={"g_ptr", "y_ptr", "out_ptr"},
                                          variants={"CHANNELS_LAST": (False, True)}),
    ("squeeze_excite", "_planes_sum_kernel"): dict(data={"a_ptr", "b_ptr"}, variants={"PRODUCT": (False, True)}),
    ("squeeze_excite", "_pixels_sum_kernel"): dict(data={"a_ptr", "b_ptr"}, variants={"PRODUCT": (False, True)}),
    ("squeeze_excite", "_scale_kernel"): dict(data={"x_ptr", "out_ptr"},
                                              variants={"HAS_BIAS": (False, True), "CHANNELS_LAST": (False, True)}),
    # grad_weight sums are written in the weight's dtype, the other sums in float32.
    ("_common", "_sum_rows_kernel"): dict(data={"out_ptr", "out2_ptr"}, variants={},
                                          launch=dict(BLOCK_R=8, BLOCK_M=128, num_warps=4)),
}
FLOAT_ARGS = {"factor"}
STRIDE = re.compile(r"^s[a-z][nchwp]$")


def _modules():
    import importlib
    return {name: importlib.import_module(f"effnet_fast.kernels.{name}") for name in
            ("dwconv_bn_silu", "bn_silu", "squeeze_excite", "_common")}


def discover():
    """[(module, attribute, JITFunction, configs, layout)] for every kernel defined in
    effnet_fast.kernels: each autotuned wrapper (one per layout where the module has
    per-layout variants) and each directly launched @triton.jit kernel; raises when a
    kernel has no entry in KERNELS (a new kernel must be added there)."""
    import triton
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction
    found, covered = [], set()
    modules = _modules()
    tuned = {id(obj.fn) for mod in modules.values() for obj in vars(mod).values() if isinstance(obj, Autotuner)}
    for mod_name, mod in modules.items():
        for attr, obj in sorted(vars(mod).items()):
            if isinstance(obj, Autotuner):
                fn, configs = obj.fn, list(obj.configs)
            elif isinstance(obj, JITFunction) and attr.endswith("_kernel") and id(obj) not in tuned:
                fn, configs = obj, None
            else:
                continue
            if getattr(fn, "__module__", mod.__name__) != mod.__name__:
                continue  # imported from another module, listed there
            key = (mod_name, fn.__name__)
            if key not in KERNELS:
                raise KeyError(f"kernel {mod_name}.{fn.__name__} has no entry in benchmarks/triton_aot.py KERNELS")
            covered.add(key)
            if configs is None:
                launch = dict(KERNELS[key]["launch"])
                warps = launch.pop("num_warps")
                configs = [triton.Config(launch, num_warps=warps)]
            layout = "nhwc" if attr.endswith("_nhwc") else "nchw" if attr.endswith("_nchw") else None
            found.append((mod_name, attr, fn, configs, layout))
    missing = set(KERNELS) - covered
    if missing:
        raise KeyError(f"KERNELS lists kernels not found in effnet_fast.kernels: {sorted(missing)}")
    return found


def jobs(quick=False):
    """Every (module, attribute, config index, constexpr variant, dtype, arch) to compile;
    quick: the first config of each kernel (the one used without autotuning), one
    constexpr variant (the largest) and float32 data."""
    import itertools
    out = []
    for mod_name, attr, fn, configs, layout in discover():
        spec = KERNELS[(mod_name, fn.__name__)]
        names = list(spec["variants"])
        variants = [dict(zip(names, vals)) for vals in itertools.product(*spec["variants"].values())]
        dtypes = DATA_DTYPES if spec["data"] else ("fp32",)
        config_ids = range(len(configs))
        if quick:
            config_ids, variants = [0], variants[-1:]
            dtypes = ["fp32"]
        for ci, variant, dtype, arch in itertools.product(config_ids, variants, dtypes, ARCHS):
            out.append(dict(module=mod_name, attr=attr, kernel=fn.__name__, config=ci, variant=variant, dtype=dtype,
                            arch=arch, layout=layout))
    return out


def _signature(fn, spec, config, variant, dtype, layout):
    sig, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        param = fn.params[i]
        if param.is_constexpr:
            sig[name] = "constexpr"
            if name in config.kwargs:
                constexprs[name] = config.kwargs[name]
            elif name in variant:
                constexprs[name] = variant[name]
            else:
                raise KeyError(f"{fn.__name__}: no value for constexpr {name}")
        elif name.endswith("_ptr"):
            sig[name] = "*" + (dtype if name in spec["data"] else "fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in FLOAT_ARGS:
            sig[name] = "fp32"
        elif layout and STRIDE.match(name) and name[-1] in ("c" if layout == "nhwc" else "wp"):
            sig[name] = "constexpr"  # a stride of 1 is specialised to a constant at run time
            constexprs[name] = 1
        else:
            sig[name] = "i32"
    return sig, constexprs, attrs


def _tool(name):
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_one(job):
    """Compile one job; returns it with regs, stack, local, spill_st, spill_ld, smem and
    seconds, or with error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    start = time.time()
    out = dict(job)
    try:
        mod = _modules()[job["module"]]
        obj = getattr(mod, job["attr"])
        tuned = hasattr(obj, "configs")  # an Autotuner; else the JITFunction itself
        fn = obj.fn if tuned else obj
        spec = KERNELS[(job["module"], fn.__name__)]
        if not tuned:
            launch = dict(spec["launch"])
            warps = launch.pop("num_warps")
            config = triton.Config(launch, num_warps=warps)
        else:
            config = obj.configs[job["config"]]
        sig, constexprs, attrs = _signature(fn, spec, config, job["variant"], job["dtype"], job["layout"])
        src = ASTSource(fn, sig, constexprs, attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", job["arch"], 32),
                                  options={"num_warps": config.num_warps, "num_stages": config.num_stages})
        out["config_desc"] = ", ".join(f"{k}={v}" for k, v in config.kwargs.items()) + f", warps={config.num_warps}"
        out["smem"] = compiled.metadata.shared
        with tempfile.TemporaryDirectory() as tmp:
            cubin, ptx = os.path.join(tmp, "k.cubin"), os.path.join(tmp, "k.ptx")
            with open(cubin, "wb") as f:
                f.write(compiled.asm["cubin"])
            with open(ptx, "w") as f:
                f.write(compiled.asm["ptx"])
            usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", cubin], capture_output=True,
                                   text=True, check=True).stdout
            m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
            out.update(regs=int(m.group(1)), stack=int(m.group(2)), static_smem=int(m.group(3)),
                       local=int(m.group(4)))
            gpu = re.search(r"\.target\s+(sm_\w+)", compiled.asm["ptx"]).group(1)
            verbose = subprocess.run([_tool("ptxas"), "-v", f"--gpu-name={gpu}", ptx, "-o", os.path.join(tmp, "k.o")],
                                     capture_output=True, text=True, check=True).stderr
            m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", verbose)
            out.update(spill_st=int(m.group(2)), spill_ld=int(m.group(3)), ptxas_stack=int(m.group(1)))
            out["ptxas_regs"] = int(re.search(r"Used (\d+) registers", verbose).group(1))
    except Exception as exc:  # reported per job; the caller decides
        out["error"] = f"{type(exc).__name__}: {exc}"[:2000]
    out["seconds"] = time.time() - start
    return out


def run(quick=False, workers=2):
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("triton_aot.py: unset TRITON_INTERPRET (the interpreter has no compiler)")
    todo = jobs(quick)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            return list(pool.map(compile_one, todo, chunksize=4))
    return [compile_one(j) for j in todo]


def bad(r):
    return "error" in r or r["spill_st"] or r["spill_ld"] or r["local"] or r["stack"]


def variant_desc(r):
    return ", ".join(f"{k}={v}" for k, v in r["variant"].items())


def markdown(results, command):
    ok = [r for r in results if "error" not in r]
    kernels = sorted({(r["module"], r["attr"]) for r in results})
    archs = sorted({r["arch"] for r in results}, reverse=True)
    lines = [f"Produced by `{command}` (Triton {_triton_version()}, no GPU needed).", ""]
    regs = [r["regs"] for r in ok]
    spilled = [r for r in ok if bad(r)]
    errors = [r for r in results if "error" in r]
    lines.append(f"Summary: **{len(results)} kernel builds ({len(kernels)} kernels x configs x constexpr variants x "
                 f"dtypes, {len(results) // max(1, len(archs))} per architecture), "
                 + (f"{min(regs)} to {max(regs)} registers, " if regs else "")
                 + (f"{len(spilled)} with spills or a stack frame" if spilled else "no spills, no stack frame, no "
                    "local memory anywhere")
                 + (f", {len(errors)} failed to compile" if errors else "") + ".**")
    lines += ["", "Per kernel, config and constexpr variant: registers per thread (float32 / float16 / bfloat16 "
              "data; one number when they agree), Triton's shared memory per block (bytes, the largest over "
              "the dtypes), and spill stores + loads (bytes, the largest over the dtypes).", ""]
    head = ["kernel", "config", "variant"] + [f"sm_{a} {w}" for a in archs for w in ("regs", "smem B", "spills B")]
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    groups = {}
    for r in results:
        groups.setdefault((r["module"], r["attr"], r["config"], variant_desc(r)), []).append(r)
    for (mod, attr, ci, var), rs in sorted(groups.items()):
        desc = next((r["config_desc"] for r in rs if "config_desc" in r), f"#{ci}")
        cells = [f"`{mod}.{attr}`", desc, var or "-"]
        for arch in archs:
            per = sorted((r for r in rs if r["arch"] == arch), key=lambda r: DATA_DTYPES.index(r["dtype"]))
            if any("error" in r for r in per):
                cells += ["error", "-", "-"]
                continue
            reg_list = [r["regs"] for r in per]
            cells.append(str(reg_list[0]) if len(set(reg_list)) == 1 else " / ".join(map(str, reg_list)))
            cells.append(str(max(r["smem"] for r in per)))
            cells.append(str(max(r["spill_st"] + r["spill_ld"] for r in per)))
        lines.append("| " + " | ".join(cells) + " |")
    for r in errors:
        lines.append(f"\nFailed: `{r['module']}.{r['attr']}` config {r['config']} {variant_desc(r)} {r['dtype']} "
                     f"sm_{r['arch']}: {r['error'].splitlines()[0]}")
    return "\n".join(lines)


def summary(results):
    ok = [r for r in results if "error" not in r]
    kernels = {(r["module"], r["attr"]) for r in results}
    out = [f"{len(results)} builds of {len(kernels)} kernels for {sorted({r['arch'] for r in results})}, "
           f"{sum(r['seconds'] for r in results):.0f} s of compilation"]
    if ok:
        top = max(ok, key=lambda r: r["regs"])
        out.append(f"registers {min(r['regs'] for r in ok)}..{top['regs']} (max: {top['module']}.{top['attr']} "
                   f"{top['config_desc']} {variant_desc(top)} {top['dtype']} sm_{top['arch']})")
        out.append(f"shared memory up to {max(r['smem'] for r in ok)} B")
    for r in results:
        if "error" in r:
            out.append(f"FAILED {r['module']}.{r['attr']} #{r['config']} {variant_desc(r)} {r['dtype']} "
                       f"sm_{r['arch']}: {r['error'].splitlines()[0]}")
        elif bad(r):
            out.append(f"SPILLS {r['module']}.{r['attr']} {r['config_desc']} {variant_desc(r)} {r['dtype']} "
                       f"sm_{r['arch']}: stack {r['stack']}, spill st/ld {r['spill_st']}/{r['spill_ld']}, "
                       f"local {r['local']}")
    if not any(bad(r) for r in results):
        out.append("no compile failures, no spills, no stack frames")
    return "\n".join(out)


def _triton_version():
    import triton
    return triton.__version__


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="first config, the largest constexpr variant, float32 only")
    p.add_argument("--json", help="write every build's resources to this file")
    p.add_argument("--markdown", help="write the markdown table to this file")
    p.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1))
    args = p.parse_args(argv)
    results = run(args.quick, args.jobs)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.markdown:
        command = "python benchmarks/triton_aot.py" + (" --quick" if args.quick else "")
        with open(args.markdown, "w") as f:
            f.write(markdown(results, command) + "\n")
    print(summary(results))
    return 1 if any(bad(r) for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
