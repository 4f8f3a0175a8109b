#!/usr/bin/env bash
# The one script for a GPU call: install carried wheels, build the extension from source, run the
# tests, compute-sanitizer, the main job, the benchmark and an A/B of two builds. Run from anywhere:
#
#     bash benchmarks/gpu_check.sh
#
# Every stage runs even when an earlier one failed; a summary table (stage, result, seconds) is
# printed last and the exit code is non-zero when any stage failed.
#
# Environment:
#   STAGES   stages to run, in this order (default "build test sanitize main bench"):
#            build    pip install --no-build-isolation --no-deps -e . (MAX_JOBS=16, MLSTM_EXT_CUDA=1),
#                     log in $OUT/build.log, ptxas resource usage in $OUT/ptxas_resource_usage.txt
#            test     pytest -q tests (every test; $PYTEST_ARGS added)
#            sanitize compute-sanitizer memcheck and racecheck on benchmarks/sanitize_case.py (every
#                     op: the H step, the states, the whole forward)
#            main     python3 -m mlstm_ext
#            bench    benchmarks/bench_gpu.py --quick (BENCH=full: --full; BENCH=check:
#                     --check-only); $BENCH_ARGS added (e.g. "--tables hstep"); then
#                     benchmarks/bench_step.py (the generation step), bench_step.md in $OUT
#            ab       A/B of one op (the H step; AB_ARGS="--ab-op fwbw": forward + backward), old
#                     build against new: builds the tree in $AB_BASE (default
#                     .ab_base: a copy of older sources in an ignored folder, e.g.
#                     `mkdir -p .ab_base && git archive OLD_COMMIT | tar -x -C .ab_base`) with
#                     `python setup.py build_ext --inplace` there ($AB_NVCC_FLAGS added to its nvcc
#                     flags: an A/B of a -D knob on a copy of the current sources), and the current
#                     tree the same way when the build stage did not run; then
#                     benchmarks/bench_gpu.py --ab BASE_LIB,CURRENT_LIB ($AB_ARGS added, e.g.
#                     "--full --rounds 5"); ab.md / ab.json in $OUT
#            profile  Nsight Compute on one launch of each kernel in $PROFILE_CASES (words
#                     KERNEL_REGEX:OP:B,NH,S,DHQK,DHHV,L run by benchmarks/ncu_case.py; default: bw_pre and
#                     bw_post at (8,16,4096,128,128,128), the states kernel and the H step at
#                     (1,8,16384,256,512,128)): occupancy, scheduler and stall numbers in
#                     $OUT/ncu.txt; then benchmarks/bench_backward.py --profile 1 (the backward's
#                     kernels, and its exact against its normaliser-constant time) in
#                     $OUT/bench_backward.md
#   OUT      output folder (default /tmp/mlstm_gpu_out); logs, bench.md/.json/.png go there (with
#            more than 8 files there at the end, this script's logs go into $OUT/logs.tgz)
#   BENCH    quick (default) | full | check
#   PTXAS_V  1 (default): build with NVCC_APPEND_FLAGS=-Xptxas=-v to record registers/spills
#   SANITIZE_TIMEOUT  seconds per sanitizer run (default 300)
set -euo pipefail
export PYTHONUNBUFFERED=1

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD
OUT=${OUT:-/tmp/mlstm_gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export OUT
STAGES=${STAGES:-"build test sanitize main bench"}
BENCH=${BENCH:-quick}
PY=${PYTHON:-python3}
T_START=$SECONDS

NAMES=()
RESULTS=()
SECS=()

# run_stage NAME FUNCTION: runs FUNCTION in a subshell with errexit, records its result.
run_stage() {
    local name=$1 fn=$2 rc t0=$SECONDS
    echo
    echo "================ [$name] $(date +%T) ================"
    set +e
    (set -e; "$fn")
    rc=$?
    set -e
    NAMES+=("$name")
    SECS+=($((SECONDS - t0)))
    if [ "$rc" -eq 0 ]; then RESULTS+=("PASS"); else RESULTS+=("FAIL (rc=$rc)"); fi
    echo "---------------- [$name] rc=$rc in $((SECONDS - t0)) s"
}

want() { [[ " $STAGES " == *" $1 "* ]]; }

# ------------------------------------------------------------------ setup (always)
setup_wheels() {
    if compgen -G ".whl/*.whl" >/dev/null; then
        echo "installing carried wheels: $(ls .whl/*.whl | xargs -n1 basename | tr '\n' ' ')"
        "$PY" -m pip install -q --no-index --no-deps --upgrade --target /tmp/site .whl/*.whl
    else
        echo "no .whl/*.whl to install"
    fi
}
run_stage wheels setup_wheels
if [ -d /tmp/site ]; then
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

echo
echo "================ [info] ================"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv \
        2>&1 | tee "$OUT/nvidia-smi.txt" || true
    nvidia-smi >>"$OUT/nvidia-smi.txt" 2>&1 || true
else
    echo "nvidia-smi not found"
fi
"$PY" - <<'EOF' || true
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| torch CUDA", torch.version.cuda,
      "| cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("GPU:", torch.cuda.get_device_name(0), "| SMs", p.multi_processor_count,
          "| memory %.1f GiB" % (p.total_memory / 2**30), "| capability", torch.cuda.get_device_capability(0))
try:
    import triton
    print("triton", triton.__version__)
except Exception as e:
    print("triton: not importable:", e)
try:
    import mlstm_kernels
    print("mlstm_kernels", mlstm_kernels.__version__, mlstm_kernels.__file__)
except Exception as e:
    print("mlstm_kernels: not importable:", e)
EOF
(command -v nvcc >/dev/null && nvcc --version | tail -n 2) || echo "nvcc not on PATH (CUDA_HOME=${CUDA_HOME:-unset})"
echo "stages: $STAGES | BENCH=$BENCH | OUT=$OUT | nproc $(nproc)"

# ------------------------------------------------------------------ build
do_build() {
    local log=$OUT/build.log stamp
    export MAX_JOBS=${MAX_JOBS:-16}
    export MLSTM_EXT_CUDA=${MLSTM_EXT_CUDA:-1}
    if [ "${PTXAS_V:-1}" = 1 ]; then
        export NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:+$NVCC_APPEND_FLAGS }-Xptxas=-v"
    fi
    stamp=$(mktemp)
    echo "building (MAX_JOBS=$MAX_JOBS MLSTM_EXT_CUDA=$MLSTM_EXT_CUDA NVCC_APPEND_FLAGS=${NVCC_APPEND_FLAGS:-}), log: $log"
    if ! "$PY" -m pip install -v --no-build-isolation --no-deps -e . >"$log" 2>&1; then
        echo "pip install -e . FAILED. Error lines:"
        grep -n -E "error|Error|FAILED:" "$log" | grep -v -E "Werror|error-exitcode" | head -n 30 || true
        echo "---- tail of $log ----"
        tail -n 60 "$log"
        if grep -q -E "^FAILED: |error: command .*(nvcc|c\+\+|g\+\+|gcc)" "$log"; then
            return 1  # a compile error: building again the other way would fail the same
        fi
        echo "(not a compile error: trying setup.py build_ext --inplace)"
    fi
    if [ -z "$(find mlstm_ext -maxdepth 1 -name '_C*.so' -newer "$stamp")" ]; then
        echo "no fresh mlstm_ext/_C*.so; running setup.py build_ext --inplace (log appended)"
        if ! "$PY" setup.py build_ext --inplace >>"$log" 2>&1; then
            echo "---- tail of $log ----"
            tail -n 60 "$log"
            return 1
        fi
    fi
    rm -f "$stamp"
    ls -la mlstm_ext/_C*.so
    if grep -q -E "ptxas info|registers" "$log"; then
        grep -E "ptxas (info|warning)|bytes stack frame|registers|spill" "$log" \
            >"$OUT/ptxas_resource_usage.txt" || true
        echo "ptxas resource usage: $OUT/ptxas_resource_usage.txt; per kernel (arch, registers, smem, spills):"
        "$PY" - "$log" <<'PYEOF' | tee "$OUT/ptxas_summary.txt" || true
import re, subprocess, sys
rows, cur, spill = [], None, ""
for line in open(sys.argv[1], errors="replace"):
    m = re.search(r"Compiling entry function '([^']+)' for '([^']+)'", line)
    if m:
        cur, spill = (m.group(1), m.group(2)), ""
        continue
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m and cur:
        spill = f"stack {m.group(1)} spill st/ld {m.group(2)}/{m.group(3)}"
    m = re.search(r"Used (\d+) registers(.*)", line)
    if m and cur:
        smem = re.search(r"(\d+) bytes smem", m.group(2))
        rows.append((cur[1], int(m.group(1)), smem.group(1) if smem else "0", spill, cur[0]))
        cur = None
names = sorted({r[4] for r in rows})
try:
    dem = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.split("\n")
    dem = dict(zip(names, dem))
except Exception:
    dem = {}
for arch, regs, smem, spill, name in sorted(set(rows)):
    print(f"{arch:8} regs {regs:3} smem {smem:>6} {spill or 'no spill info':32} {dem.get(name, name)[:150]}")
if not rows:
    print("(no ptxas -v lines found)")
PYEOF
    fi
    grep -E "warning" "$log" | grep -i -E "spill|ptxas" | head -n 10 || true
    "$PY" -c "import mlstm_ext; print('library', mlstm_ext.library_path(), '| CUDA kernels:', mlstm_ext.has_cuda_kernels()); assert mlstm_ext.has_cuda_kernels(), 'built without CUDA kernels'"
}
want build && run_stage build do_build

# ------------------------------------------------------------------ tests
pytest_rc_ok() {  # pytest exit 5 = no tests collected: not a failure here
    local rc=$1
    if [ "$rc" -eq 5 ]; then echo "(no tests collected)"; return 0; fi
    return "$rc"
}
do_test() {
    local rc=0
    # shellcheck disable=SC2086
    "$PY" -m pytest -q tests ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/pytest.log" || rc=$?
    pytest_rc_ok "$rc"
}
want test && run_stage test do_test

# ------------------------------------------------------------------ compute-sanitizer
find_sanitizer() {
    local c
    for c in "$(command -v compute-sanitizer 2>/dev/null || true)" \
             "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" \
             /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer; do
        if [ -n "$c" ] && [ -x "$c" ]; then echo "$c"; return 0; fi
    done
    return 1
}
do_memcheck() {
    local cs
    cs=$(find_sanitizer) || { echo "compute-sanitizer not found"; return 1; }
    "$cs" --version | tail -n 1
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "${SANITIZE_TIMEOUT:-300}" \
        "$cs" --tool memcheck --error-exitcode 1 --leak-check no \
        "$PY" benchmarks/sanitize_case.py 2>&1 | tee "$OUT/memcheck.log"
}
do_racecheck() {
    local cs
    cs=$(find_sanitizer) || { echo "compute-sanitizer not found"; return 1; }
    timeout "${SANITIZE_TIMEOUT:-300}" \
        "$cs" --tool racecheck --racecheck-report all --error-exitcode 1 \
        "$PY" benchmarks/sanitize_case.py 2>&1 | tee "$OUT/racecheck.log"
}
if want sanitize; then
    run_stage memcheck do_memcheck
    run_stage racecheck do_racecheck
fi

# ------------------------------------------------------------------ main job
do_main() {
    "$PY" -m mlstm_ext 2>&1 | tee "$OUT/main.log"
}
want main && run_stage main do_main

# ------------------------------------------------------------------ benchmark
do_bench() {
    local mode
    case "$BENCH" in
        full) mode="--full" ;;
        check) mode="--check-only" ;;
        *) mode="--quick" ;;
    esac
    # shellcheck disable=SC2086
    "$PY" benchmarks/bench_gpu.py $mode --out "$OUT/bench.md" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
    # The generation step against mlstm-kernels' step kernels (launch-bound: seconds).
    "$PY" benchmarks/bench_step.py --device cuda --budget 0.5 2>&1 | tee "$OUT/bench_step.md"
}
want bench && run_stage "bench($BENCH)" do_bench

# ------------------------------------------------------------------ A/B of two builds
build_inplace() {  # TREE LOG [EXTRA_NVCC_FLAGS]
    echo "building $1 in place (log $2)"
    if ! (cd "$1" && MAX_JOBS=${MAX_JOBS:-16} MLSTM_EXT_CUDA=1 \
            NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:+$NVCC_APPEND_FLAGS }${3:-}" \
            "$PY" setup.py build_ext --inplace) >"$2" 2>&1; then
        tail -n 40 "$2"
        return 1
    fi
}
library_of() {  # TREE: its mlstm_ext/_C*.so (the one mlstm_ext.library_path() would pick)
    find "$1/mlstm_ext" -maxdepth 1 -name '_C*.so' | sort | head -n 1
}
do_ab() {
    local base=${AB_BASE:-.ab_base} old new
    if [ ! -f "$base/setup.py" ]; then
        echo "AB_BASE=$base holds no setup.py: put the old sources there, e.g."
        echo "  mkdir -p .ab_base && git archive OLD_COMMIT | tar -x -C .ab_base"
        return 1
    fi
    base=$(cd "$base" && pwd)
    if ! want build || [ -z "$(library_of "$REPO")" ]; then
        build_inplace "$REPO" "$OUT/build_ab_new.log"
    fi
    build_inplace "$base" "$OUT/build_ab_old.log" "${AB_NVCC_FLAGS:-}"
    old=$(library_of "$base")
    new=$(library_of "$REPO")
    echo "old: $old"
    echo "new: $new"
    # shellcheck disable=SC2086
    "$PY" benchmarks/bench_gpu.py --ab "$old,$new" --out "$OUT/ab.md" ${AB_ARGS:-} 2>&1 | tee "$OUT/ab.log"
}
want ab && run_stage ab do_ab

# ------------------------------------------------------------------ Nsight Compute
do_profile() {
    local ncu spec kernel op shape
    ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -n 1) || true
    [ -n "$ncu" ] || { echo "ncu not found"; return 1; }
    : >"$OUT/ncu.txt"
    for spec in ${PROFILE_CASES:-bw_pre:bw:8,16,4096,128,128,128 bw_post:bw:8,16,4096,128,128,128 \
                 states_kernel:states:1,8,16384,256,512,128 hintra:hstep:1,8,16384,256,512,128}; do
        IFS=: read -r kernel op shape <<<"$spec"
        echo "== $kernel ($op at $shape)" | tee -a "$OUT/ncu.txt"
        local sections=(--section SpeedOfLight --section Occupancy --section SchedulerStats --section WarpStateStats)
        # The stall reasons as numbers (the section shows them only as a chart); without them if
        # this ncu refuses the metric pattern.
        timeout 180 "$ncu" -k "regex:$kernel" --launch-skip 1 --launch-count 1 "${sections[@]}" \
            --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
            "$PY" benchmarks/ncu_case.py --op "$op" --shape "$shape" >"$OUT/ncu_$kernel.log" 2>&1 || true
        grep -q Duration "$OUT/ncu_$kernel.log" ||
            timeout 180 "$ncu" -k "regex:$kernel" --launch-skip 1 --launch-count 1 "${sections[@]}" \
                "$PY" benchmarks/ncu_case.py --op "$op" --shape "$shape" >"$OUT/ncu_$kernel.log" 2>&1 || true
        grep -E "^  [a-z_]+.*\(|Duration|Throughput|Eligible|Active Warps|Issued Warp|Occupancy|Block Limit Reg|Warp Cycles|stalled" \
            "$OUT/ncu_$kernel.log" | grep -v -E " 0(\.0+)?$" | tee -a "$OUT/ncu.txt" || true
    done
    "$PY" benchmarks/bench_backward.py --profile 1 2>&1 | tee "$OUT/bench_backward.md"
}
want profile && run_stage profile do_profile

# ------------------------------------------------------------------ summary
echo
echo "================ summary ($((SECONDS - T_START)) s; outputs in $OUT) ================"
printf '%-14s %-14s %6s\n' stage result seconds
fail=0
for i in "${!NAMES[@]}"; do
    printf '%-14s %-14s %6s\n' "${NAMES[$i]}" "${RESULTS[$i]}" "${SECS[$i]}"
    [ "${RESULTS[$i]}" = PASS ] || fail=1
done
# The device tool brings back at most 8 files from $OUT: past that, this script's logs go into
# one archive, logs.tgz, beside the tables and plots (a caller's own log in $OUT stays).
if [ "$(ls "$OUT" | wc -l)" -gt 8 ]; then
    (cd "$OUT" && ls | grep -E '^((build.*|main|memcheck|racecheck|pytest|bench|ab|ncu_.*)\.log|(ncu|nvidia-smi|ptxas_.*)\.txt)$' > "$OUT.list" || true
     [ -s "$OUT.list" ] && tar czf logs.tgz -T "$OUT.list" && xargs rm -f < "$OUT.list"; rm -f "$OUT.list")
fi
ls "$OUT" | tr '\n' ' '
echo
exit "$fail"
