#!/usr/bin/env bash
# One-command GPU check (about 8 minutes at most on an H100 or H200, nothing downloaded):
#   1. build and install the package with its CUDA extension (sm_90 only, for speed),
#   2. run the GPU tests (the cases on a CUDA device, every backend),
#   3. run the benchmark suite on the GPU (pytest benchmarks/ --bench-devices cuda, bounded by
#      --bench-budget-s; each fused row checked against eager before it is timed),
#   4. print its tables (benchmarks/report.py) and save them, with the chart, in $LOGS.
# Logs go to $OUT when set (else /tmp/effnet_fast_gpu_check). PYTHON picks the interpreter.
set -u -o pipefail
cd "$(dirname "$0")/.."
LOGS="${OUT:-/tmp/effnet_fast_gpu_check}"
mkdir -p "$LOGS"
PY="${PYTHON:-$(command -v python || command -v python3)}"
TOTAL_S=450
START=$(date +%s)
unset TRITON_INTERPRET

elapsed() { echo $(( $(date +%s) - START )); }

# run_step NAME LIMIT_S CMD...: run CMD with its output in $LOGS/NAME.log, bounded by
# LIMIT_S and by what is left of TOTAL_S; prints the status and the log's last lines.
run_step() {
    local name=$1 limit=$2 left rc
    shift 2
    left=$(( TOTAL_S - $(elapsed) ))
    (( limit > left )) && limit=$left
    if (( limit < 10 )); then
        echo "== $name: skipped, time budget spent"
        return 124
    fi
    echo "== $name (limit ${limit}s, at $(elapsed)s)"
    timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
    rc=$?
    echo "   $name: exit $rc after $(elapsed)s; last lines of $LOGS/$name.log:"
    tail -n 4 "$LOGS/$name.log" | sed 's/^/   | /'
    return $rc
}

"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)" \
    | tee "$LOGS/versions.log"

# 1. Build. Without the CUDA part if that fails, so the Triton backend is still checked.
# PIP_BREAK_SYSTEM_PACKAGES: allow the editable install into a system Python.
export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 PIP_BREAK_SYSTEM_PACKAGES=1
if ! EFFNET_FAST_BUILD_CUDA=1 run_step build 240 "$PY" -m pip install -e . --no-build-isolation --no-deps --no-index -v; then
    echo "   CUDA build failed: installing without the CUDA extension"
    EFFNET_FAST_BUILD_CUDA=0 run_step build_nocuda 120 "$PY" -m pip install -e . --no-build-isolation --no-deps --no-index
fi
"$PY" -c "import effnet_fast; print(effnet_fast.build_info())" 2>&1 | tee "$LOGS/build_info.log"

# 2. GPU tests. One Triton config per kernel here (compiling every autotuning config would
# take minutes); the benchmark below autotunes and checks each fused row against eager.
# No TF32 in the float32 references (cuDNN/cuBLAS), their tolerance is 2e-4.
# The op tests go first; -v logs each result as it comes, so a timeout still leaves them.
EFFNET_FAST_TRITON_AUTOTUNE=0 NVIDIA_TF32_OVERRIDE=0 run_step tests 150 \
    "$PY" -m pytest tests/test_dwconv_bn_silu.py tests/test_squeeze_excite.py tests -m "cuda and not slow" -v -rfEs \
    -p no:cacheprovider --continue-on-collection-errors --junitxml="$LOGS/tests.xml"

# 3. Benchmark suite on the GPU: the ops in priority order (the depthwise op first), float32 and
# bfloat16, both layouts, eval and training; the cases that would start after the budget are
# skipped, so the JSON of those run is always written.
left=$(( TOTAL_S - $(elapsed) - 40 ))
(( left > 220 )) && left=220
run_step bench $(( left + 30 )) "$PY" -m pytest benchmarks/ -q -p no:cacheprovider --benchmark-only \
    --bench-devices cuda --bench-ops dwconv_bn_silu,model,bn_silu,squeeze_excite_project,squeeze_excite \
    --bench-time 0.05 --bench-min-rounds 10 --bench-budget-s "$left" \
    --benchmark-json "$LOGS/bench.json" --benchmark-group-by=group --benchmark-columns=median,min,rounds

# 4. The tables (markdown, as in docs/PERFORMANCE.md) and the chart.
"$PY" benchmarks/report.py "$LOGS/bench.json" --doc "$LOGS/PERFORMANCE_gpu.md" --png "$LOGS/performance_cuda.png" \
    --command "bash benchmarks/gpu_check.sh" >"$LOGS/report.log" 2>&1 || tail -n 5 "$LOGS/report.log"

echo
echo "== summary (total $(elapsed)s, logs in $LOGS)"
echo "tests: $(grep -c ' PASSED' "$LOGS/tests.log") passed, $(grep -c ' FAILED' "$LOGS/tests.log") failed"
grep -E "^(FAILED|ERROR)| (passed|failed|skipped|errors?)( |,|$)" "$LOGS/tests.log" | tail -n 15
grep -E "passed|failed|skipped" "$LOGS/bench.log" | tail -n 3
[ -f "$LOGS/PERFORMANCE_gpu.md" ] && cat "$LOGS/PERFORMANCE_gpu.md"
