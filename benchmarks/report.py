"""Turn a saved run of the benchmark suite (pytest-benchmark JSON) into the per-op tables of
docs/PERFORMANCE.md and a PNG chart of the speedup over eager per layer shape; optionally
regenerate the Triton part of docs/CUDA_RESOURCES.md (benchmarks/triton_aot.py).

  python benchmarks/report.py                       the newest run under .benchmarks/
  python benchmarks/report.py RUN.json --doc docs/PERFORMANCE.md --png docs/performance_cpu.png
  python benchmarks/report.py RUN.json --print      the tables on stdout only
  python benchmarks/report.py --aot-only            only the Triton resource tables

The tables go between the markers `<!-- per-op tables: begin -->` and `<!-- per-op
tables: end -->` of the doc (appended when it has none), which keeps the rest of the doc.
"""
import argparse
import glob
import json
import os
import re
import subprocess
import sys
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
IMPL_ORDER = ("eager", "cpu", "triton", "cuda", "compile")
OP_TITLES = {
    "dwconv_bn_silu": "Depthwise conv + BN + SiLU",
    "squeeze_excite": "Squeeze-excitation",
    "squeeze_excite_project": "Squeeze-excitation + 1x1 projection",
    "bn_silu": "BatchNorm + SiLU (after the stem, expand and head convs)",
    "model": "Whole model, EfficientNet-B0 at 224x224",
}
OP_SHAPES = {
    "dwconv_bn_silu": "C x H, k, s",
    "squeeze_excite": "C r Cr x H",
    "squeeze_excite_project": "C r Cr x H p Cout",
    "bn_silu": "C x H",
    "model": "variant",
}
MODE_TITLES = {"eval": "eval forward", "train": "training forward + backward"}
BEGIN, END = "<!-- per-op tables: begin -->", "<!-- per-op tables: end -->"
AOT_BEGIN, AOT_END = "<!-- triton resources: begin -->", "<!-- triton resources: end -->"


def newest_run():
    runs = glob.glob(os.path.join(ROOT, ".benchmarks", "*", "*.json"))
    if not runs:
        raise SystemExit("no saved run under .benchmarks/ (make bench saves one)")
    return max(runs, key=os.path.getmtime)


def load(path):
    with open(path) as f:
        data = json.load(f)
    rows = []
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        if "op" not in info:
            continue
        rows.append(dict(info, median=b["stats"]["median"], min=b["stats"]["min"], rounds=b["stats"]["rounds"],
                         shape=tuple(info["shape"]), shape_id=_shape_id(info["op"], info["shape"])))
    return data, rows


def _shape_id(op, shape):
    sys.path.insert(0, HERE)
    from cases import shape_id
    return shape_id(op, tuple(shape))


def _impls(rows):
    present = {r["impl"] for r in rows}
    return [i for i in IMPL_ORDER if i in present] + sorted(present - set(IMPL_ORDER))


def _fmt_ms(seconds):
    return "-" if seconds is None else f"{seconds * 1e3:.2f}" if seconds < 10 else f"{seconds * 1e3:.0f}"


def _fmt_ratio(value):
    return "-" if value is None else f"{value:.2f}"


def table(rows):
    """Markdown table of one (op, device, dtype, layout, mode): a row per shape and a sum."""
    impls = _impls(rows)
    fused = [i for i in impls if i != "eager"]
    has_floor = any("floor_s" in r for r in rows)
    head = ["shape"] + [f"{i} ms" for i in impls] + [f"{i} x eager" for i in fused]
    if has_floor:
        head += ["floor ms"] + [f"{i} x floor" for i in impls]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    by_shape = defaultdict(dict)
    for r in rows:
        by_shape[(r["shape"], r["shape_id"])][r["impl"]] = r
    totals = defaultdict(float)
    complete = defaultdict(lambda: True)
    floor_total = 0.0
    shapes = list(by_shape)
    for key in shapes:
        cells = by_shape[key]
        t = {i: cells[i]["median"] if i in cells else None for i in impls}
        for i in impls:
            if t[i] is None:
                complete[i] = False
            else:
                totals[i] += t[i]
        floor = next((c["floor_s"] for c in cells.values() if "floor_s" in c), None)
        floor_total += floor or 0.0
        lines.append(_row(key[1], impls, fused, t, floor if has_floor else False))
    if len(shapes) > 1:
        t = {i: totals[i] if complete[i] else None for i in impls}
        lines.append(_row("**sum**", impls, fused, t, floor_total if has_floor else False, bold=True))
    return "\n".join(lines)


def _row(label, impls, fused, t, floor, bold=False):
    b = (lambda s: f"**{s}**" if bold and s != "-" else s)
    eager = t.get("eager")
    cells = [label] + [b(_fmt_ms(t[i])) for i in impls]
    cells += [b(_fmt_ratio(eager / t[i] if eager and t[i] else None)) for i in fused]
    if floor is not False:
        cells += [b(_fmt_ms(floor))] + [b(_fmt_ratio(t[i] / floor if t[i] and floor else None)) for i in impls]
    return "| " + " | ".join(cells) + " |"


def machine_line(data, rows):
    m = data.get("machine_info", {})
    cpu = m.get("cpu", {})
    devices = sorted({r.get("device_name") or r["device"] for r in rows})
    threads = sorted({r.get("threads") for r in rows if r.get("threads")})
    torch_versions = sorted({r.get("torch") for r in rows if r.get("torch")})
    loads = [r["loadavg"] for r in rows if r.get("loadavg") is not None]
    parts = [f"{cpu.get('brand_raw', m.get('processor', '?'))}, {cpu.get('count', '?')} logical CPUs",
             f"devices: {', '.join(devices)}",
             f"torch {', '.join(torch_versions)}, {', '.join(map(str, threads))} threads"]
    if loads:
        parts.append(f"1-minute load average during the run {min(loads):.2f} to {max(loads):.2f} (the run's "
                     "own threads included)")
    return "; ".join(parts)


def _load_warning(rows):
    """A warning paragraph when other processes kept the CPUs busy during a CPU run."""
    loads = [r["loadavg"] for r in rows if r.get("loadavg") is not None and r["device"] == "cpu"]
    threads = max((r.get("threads") or 1 for r in rows), default=1)
    if not loads or max(loads) < threads + 1.0:  # the run itself keeps `threads` CPUs busy
        return []
    return [f"**The machine was loaded during this run** (1-minute load average up to {max(loads):.1f} with "
            f"{threads} threads timed): other processes took CPU time from the timed calls, so times are "
            "inflated and noisy (many come out near multiples of the scheduler's time slice) and the copy "
            "bandwidth, hence the floor, is low. Compare only ratios within one row, and rerun on a quiet "
            "machine before drawing conclusions.", ""]


def markdown(data, rows, command):
    commit = data.get("commit_info", {})
    bandwidths = {r["device"]: r["bandwidth_gbs"] for r in rows if "bandwidth_gbs" in r}
    out = [BEGIN, "",
           "Generated by `python benchmarks/report.py` from a saved run of the benchmark suite: do not edit by hand.",
           "",
           f"Command: `{command}`  ",
           f"Date: {data.get('datetime', '?')} (commit {commit.get('id', '?')[:7]}"
           f"{', uncommitted changes' if commit.get('dirty') else ''})  ",
           f"Machine: {machine_line(data, rows)}  ",
           "Copy bandwidth (read + write, the floor's divisor): "
           + ", ".join(f"{d} {bw:.1f} GB/s" for d, bw in sorted(bandwidths.items())),
           "",
           ] + _load_warning(rows) + [
           "Times are pytest-benchmark medians in ms. `x eager` = eager time / implementation time (above 1: "
           "faster than eager). The floor is the bytes that must move (eval: input read once + output written "
           "once; training: also grad_out read and grad_x written) over the copy bandwidth; `x floor` = time / "
           "floor (below 1 when a tensor stays in the cache between calls). Every implementation's output (and "
           "in training its gradients) was checked against eager before it was timed. Implementations: eager = "
           "the reference nn layers; cpu / triton / cuda = the fused op on that backend (eval: the fused kernel "
           "itself, not the BN-folded path the CPU layers take in eval); compile = torch.compile of the eager "
           "layer.", ""]
    keys = sorted({(r["op"], r["device"], r["dtype"], r["batch"]) for r in rows},
                  key=lambda k: (list(OP_TITLES).index(k[0]) if k[0] in OP_TITLES else 99, k[1:]))
    for op, device, dtype, batch in keys:
        sub = [r for r in rows if (r["op"], r["device"], r["dtype"], r["batch"]) == (op, device, dtype, batch)]
        out += [f"### {OP_TITLES.get(op, op)}, {device}, {dtype}, batch {batch}", ""]
        if op != "model":
            out += [f"Shapes: {OP_SHAPES[op]}.", ""]
        for layout in ("nchw", "channels_last"):
            for mode in ("eval", "train"):
                cell = [r for r in sub if r["layout"] == layout and r["mode"] == mode]
                if cell:
                    out += [f"{layout}, {MODE_TITLES[mode] if op != 'model' else mode_model(mode)}:", "",
                            table(cell), ""]
    out.append(END)
    return "\n".join(out)


def mode_model(mode):
    return "eval forward" if mode == "eval" else "one SGD training step"


def chart(rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ops = [op for op in OP_TITLES if any(r["op"] == op for r in rows)]
    combos = [(lay, mode) for lay in ("nchw", "channels_last") for mode in ("eval", "train")
              if any(r["layout"] == lay and r["mode"] == mode for r in rows)]
    fig, axes = plt.subplots(len(ops), len(combos), figsize=(4.2 * len(combos), 2.8 * len(ops)), squeeze=False)
    for i, op in enumerate(ops):
        for j, (layout, mode) in enumerate(combos):
            ax = axes[i][j]
            sub = [r for r in rows if r["op"] == op and r["layout"] == layout and r["mode"] == mode]
            shapes = list(dict.fromkeys(r["shape_id"] for r in sub))
            eager = {(r["shape_id"], r["device"], r["dtype"]): r["median"] for r in sub if r["impl"] == "eager"}
            series = sorted({(r["device"], r["dtype"], r["impl"]) for r in sub if r["impl"] != "eager"})
            width = 0.8 / max(1, len(series))
            for k, (device, dtype, impl) in enumerate(series):
                xs, ys = [], []
                for s_idx, s in enumerate(shapes):
                    r = next((r for r in sub if (r["shape_id"], r["device"], r["dtype"], r["impl"])
                              == (s, device, dtype, impl)), None)
                    base = eager.get((s, device, dtype))
                    if r and base:
                        xs.append(s_idx + (k - (len(series) - 1) / 2) * width)
                        ys.append(base / r["median"])
                # Bars from 1 (as fast as eager) up to faster or down to slower.
                ax.bar(xs, [y - 1 for y in ys], width, bottom=1, label=f"{impl} ({device}, {dtype})")
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_yscale("log", base=2)  # 2x faster and 2x slower equally far from 1
            ax.set_xticks(range(len(shapes)))
            ax.set_xticklabels(shapes, rotation=60, ha="right", fontsize=6)
            ax.tick_params(axis="y", labelsize=7)
            ax.set_title(f"{op}: {layout}, {mode}", fontsize=8)
            if j == 0:
                ax.set_ylabel("speedup over eager", fontsize=7)
            if i == 0 and j == len(combos) - 1:
                ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def replace_block(path, block, begin, end):
    text = open(path).read() if os.path.exists(path) else ""
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(text)


def aot_block(quick=False):
    """The Triton part of docs/CUDA_RESOURCES.md, from benchmarks/triton_aot.py run in a
    process without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    md = os.path.join(ROOT, ".benchmarks", "triton_aot.md")
    os.makedirs(os.path.dirname(md), exist_ok=True)
    cmd = [sys.executable, os.path.join(HERE, "triton_aot.py"), "--markdown", md,
           "--json", os.path.join(ROOT, ".benchmarks", "triton_aot.json")] + (["--quick"] if quick else [])
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    print(proc.stdout, end="")
    if not os.path.exists(md):
        raise SystemExit(f"triton_aot.py failed:\n{proc.stderr[-3000:]}")
    with open(md) as f:
        return f"{AOT_BEGIN}\n\n{f.read().rstrip()}\n\n{AOT_END}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", nargs="?", help="pytest-benchmark JSON (default: the newest under .benchmarks/)")
    p.add_argument("--doc", default=os.path.join(ROOT, "docs", "PERFORMANCE.md"))
    p.add_argument("--png", default=None, help="chart path (default: docs/performance_<devices>.png)")
    p.add_argument("--command", default="make bench",
                   help="the command that produced the run, as the doc should show it")
    p.add_argument("--print", action="store_true", help="print the tables, write nothing")
    p.add_argument("--aot", action="store_true", help="also regenerate the Triton tables of docs/CUDA_RESOURCES.md")
    p.add_argument("--aot-only", action="store_true", help="only regenerate the Triton tables")
    p.add_argument("--aot-doc", default=os.path.join(ROOT, "docs", "CUDA_RESOURCES.md"))
    args = p.parse_args(argv)
    if args.aot or args.aot_only:
        replace_block(args.aot_doc, aot_block(), AOT_BEGIN, AOT_END)
        print(f"wrote the Triton resources into {args.aot_doc}")
        if args.aot_only:
            return 0
    path = args.run or newest_run()
    data, rows = load(path)
    if not rows:
        raise SystemExit(f"{path}: no benchmark of the suite in it")
    block = markdown(data, rows, args.command)
    if args.print:
        print(block)
        return 0
    replace_block(args.doc, block, BEGIN, END)
    devices = "_".join(sorted({r["device"] for r in rows}))
    png = args.png or os.path.join(os.path.dirname(args.doc), f"performance_{devices}.png")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed: no chart (pip install matplotlib)")
        png = None
    if png:
        cpu = data.get("machine_info", {}).get("cpu", {}).get("brand_raw", "")
        chart(rows, png, f"Speedup over eager per B0 layer shape (above 1: faster), {data.get('datetime', '')[:10]}, "
                         f"{cpu}, {', '.join(sorted({r.get('device_name') or r['device'] for r in rows}))}")
    print(f"{path}: {len(rows)} benchmarks -> {args.doc}, {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
