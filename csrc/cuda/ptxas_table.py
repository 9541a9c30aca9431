"""Summarise the ptxas report of a build log (nvcc -Xptxas=-v) as a markdown table:
registers, static shared memory, stack frame and spills per kernel and architecture.

Usage: python csrc/cuda/ptxas_table.py /tmp/cuda_build.log

The CUDA C++ part of docs/CUDA_RESOURCES.md; the Triton part comes from
benchmarks/triton_aot.py (python benchmarks/report.py --aot-only).
"""
import re
import subprocess
import sys

ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\d+)'")
FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
REGS = re.compile(r"Used (\d+) registers")
SMEM = re.compile(r"(\d+) bytes smem")


def demangle(names):
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
    return out.stdout.split("\n")[:len(names)]


def short_name(name):
    name = name.replace("effnet_fast::cuda_backend::", "").replace("c10::", "").removeprefix("void ")
    name = re.sub(r"\(.*\)$", "", name)  # the parameter list
    return name.replace("(bool)0", "false").replace("(bool)1", "true").replace("long", "int64")


def parse(lines):
    """{(kernel, arch): {regs, smem, stack, spill_st, spill_ld}} from ptxas -v lines."""
    entries, current = [], None
    for line in lines:
        if m := ENTRY.search(line):
            current = {"mangled": m.group(1), "arch": m.group(2)}
            entries.append(current)
        elif current is not None and (m := FRAME.search(line)):
            current.update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
        elif current is not None and (m := REGS.search(line)):
            current["regs"] = int(m.group(1))
            smem = SMEM.search(line)
            current["smem"] = int(smem.group(1)) if smem else 0
    names = demangle([e["mangled"] for e in entries])
    return {(short_name(n), e["arch"]): e for n, e in zip(names, entries)}


def table(report):
    archs = sorted({arch for _, arch in report}, reverse=True)
    head = ["kernel"] + [f"{a} {what}" for a in archs for what in ("regs", "static smem B", "stack/spill st/spill ld B")]
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for kernel in sorted({k for k, _ in report}):
        cells = [f"`{kernel}`"]
        for arch in archs:
            e = report.get((kernel, arch))
            cells += ([str(e["regs"]), str(e["smem"]), f'{e["stack"]} / {e["spill_st"]} / {e["spill_ld"]}']
                      if e else ["-"] * 3)
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def summary(report):
    bad = sorted(f"{k} ({a})" for (k, a), e in report.items() if e["stack"] or e["spill_st"] or e["spill_ld"])
    regs = [e["regs"] for e in report.values()]
    return (f"{len(report)} kernel builds, registers {min(regs)}..{max(regs)}, "
            + (f"stack frame or spills in: {', '.join(bad)}" if bad else "no stack frame and no spills anywhere"))


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        report = parse(f)
    print(table(report))
    print()
    print(summary(report))
