#!/usr/bin/env bash
# The device call after a landing (fourteenth session; not yet run: the device time ran out):
# build; the CUDA tests in four pytest processes side by side; the tables against Triton (default
# plan); Nsight Compute on the fused forward at xLSTM-7B's heads (what its 16-warp instance
# waits on: 13.5% fewer instructions saved 0.5%).
#   QUICK=1: only the tests the fourteenth session's landing touches (fused forward, chunkwise,
#            hostile, autograd, xlstm backend, backward), no tables (~4 minutes); else every
#            CUDA test and the tables (~8 minutes).
#   device: bash benchmarks/prepared/session14.sh > $OUT/s14.log 2>&1   (carry [".whl"])
set -uo pipefail
cd "$(dirname "$0")/../.."
export OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; t0=$SECONDS
left() { [ $((SECONDS - t0)) -lt "$1" ]; }
MAX_JOBS=16 STAGES=build bash benchmarks/gpu_check.sh > "$OUT/gc.log" 2>&1; echo "tree build rc=$? $((SECONDS - t0)) s"
export PYTHONPATH=/tmp/site
if [ "${QUICK:-0}" = 1 ]; then
  groups=("tests/test_fused_forward.py" "tests/test_chunkwise.py tests/test_hostile.py" "tests/test_autograd.py"
          "tests/test_xlstm_backend.py tests/test_backward.py")
else
  groups=("tests/test_cuda_op.py tests/test_step_cuda.py tests/test_states_cuda.py"
          "tests/test_autograd.py tests/test_backward.py"
          "tests/test_fused_forward.py tests/test_chunkwise.py tests/test_hostile.py"
          "tests/test_xlstm_backend.py tests/test_integration.py tests/test_deploy.py tests/test_errors.py tests/test_states.py tests/test_step.py tests/test_cpu_op.py tests/test_build_check.py")
fi
echo "== CUDA tests, ${#groups[@]} processes $((SECONDS - t0)) s"
g=0
for files in "${groups[@]}"; do
  g=$((g + 1))
  ( timeout ${TEST_LIMIT:-220} python3 -m pytest -q $files -m cuda -p no:cacheprovider > "$OUT/pytest_g$g.log" 2>&1; echo "group $g ($files) rc=$? $((SECONDS - t0)) s: $(tail -1 "$OUT/pytest_g$g.log")" ) &
done
wait
grep -hE "^(FAILED|ERROR)" "$OUT"/pytest_g*.log | head -20
cat "$OUT"/pytest_g*.log > "$OUT/pytest.log"; rm -f "$OUT"/pytest_g*.log
if [ "${QUICK:-0}" != 1 ]; then
  echo "== tables against Triton (default plan) $((SECONDS - t0)) s"
  left 330 && timeout 70 python3 benchmarks/bench_gpu.py --quick --tables forward,fwbw --out "$OUT/bench.md" > "$OUT/bench.log" 2>&1
  grep -A6 "^| (B" "$OUT/bench.md" 2>/dev/null | head -30
fi
ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -n 1)
shape=4,8,8192,256,512,64
echo "== Nsight Compute: fused_fw_kernel at $shape $((SECONDS - t0)) s"
left ${NCU_BEFORE:-420} || { echo "no time left for ncu"; exit 0; }
timeout 50 "$ncu" --clock-control none -k regex:fused_fw_kernel --launch-skip 1 --launch-count 1 \
    --section SpeedOfLight --section Occupancy --section SchedulerStats --section WarpStateStats \
    --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
    python3 benchmarks/ncu_case.py --op forward --shape $shape > "$OUT/ncu.log" 2>&1
grep -E "^  [a-z_]+.*\(|Duration|Throughput|Eligible|Active Warps|Issued Warp|Occupancy|Warp Cycles|stalled" \
    "$OUT/ncu.log" | grep -v -E " 0(\.0+)?$" | head -60
rm -f "$OUT"/ptxas* "$OUT"/build*.log "$OUT"/nvidia-smi.txt "$OUT"/bench.png "$OUT"/bench.json "$OUT"/gc.log
echo "== end $((SECONDS - t0)) s"
