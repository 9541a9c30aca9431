"""Summarise the ptxas -v report of a build log (nvcc -Xptxas=-v) as a markdown table:
registers, static shared memory, stack frame and spills per kernel and architecture.

Usage: python csrc/cuda/ptxas_table.py /tmp/cuda_build.log
"""
import re, subprocess, sys

def demangle(names):
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.split("\n")
    return out[:len(names)]

def short(name):
    name = name.replace("effnet_fast::cuda_backend::", "").replace("c10::", "")
    name = re.sub(r"\(.*\)$", "", name)  # drop the parameter list
    return name.replace("(bool)0", "false").replace("(bool)1", "true").replace("long", "int64").replace("int64 int64", "int64")

rows, cur = [], None
for line in open(sys.argv[1]):
    m = re.search(r"Compiling entry function '(\w+)' for '(sm_\d+)'", line)
    if m:
        cur = {"mangled": m.group(1), "arch": m.group(2)}; rows.append(cur); continue
    if cur is None: continue
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m: cur.update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
    m = re.search(r"Used (\d+) registers", line)
    if m:
        cur["regs"] = int(m.group(1))
        s = re.search(r"(\d+) bytes smem", line); cur["smem"] = int(s.group(1)) if s else 0
seen = {}
for r, d in zip(rows, demangle([r["mangled"] for r in rows])):
    seen[(short(d), r["arch"])] = r
kernels = sorted({k for k, _ in seen})
archs = sorted({a for _, a in seen})
print("| kernel | " + " | ".join(f"{a} regs | {a} static smem | {a} stack / spill st / spill ld" for a in archs) + " |")
print("| --- |" + " --- | --- | --- |" * len(archs))
for k in kernels:
    cells = []
    for a in archs:
        r = seen.get((k, a))
        cells += [str(r["regs"]), str(r["smem"]), f'{r["stack"]} / {r["spill_st"]} / {r["spill_ld"]}'] if r else ["-"] * 3
    print(f"| `{k}` | " + " | ".join(cells) + " |")
