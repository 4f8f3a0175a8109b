#!/usr/bin/env bash
# A short device call (~4 minutes) for the landed tree when little device time is left: build; the
# CUDA tests that the default plan's chunk 128 touches, four pytest processes side by side; Nsight
# Compute on the fused forward at xLSTM-7B's heads (what its 16-warp instance waits on).
#   device: bash benchmarks/prepared/session14b.sh > $OUT/s14b.log 2>&1   (carry [".whl"])
set -uo pipefail
cd "$(dirname "$0")/../.."
export OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; t0=$SECONDS
MAX_JOBS=16 STAGES=build bash benchmarks/gpu_check.sh > "$OUT/gc.log" 2>&1; echo "tree build rc=$? $((SECONDS - t0)) s"
export PYTHONPATH=/tmp/site
g=0
for files in "tests/test_fused_forward.py" "tests/test_chunkwise.py tests/test_hostile.py" "tests/test_autograd.py" \
             "tests/test_xlstm_backend.py tests/test_backward.py"; do
  g=$((g + 1))
  ( timeout ${TEST_LIMIT:-150} python3 -m pytest -q $files -m cuda -p no:cacheprovider > "$OUT/pytest_g$g.log" 2>&1; echo "group $g ($files) rc=$? $((SECONDS - t0)) s: $(tail -1 "$OUT/pytest_g$g.log")" ) &
done
wait
grep -hE "^(FAILED|ERROR)" "$OUT"/pytest_g*.log | head -20
cat "$OUT"/pytest_g*.log > "$OUT/pytest.log"; rm -f "$OUT"/pytest_g*.log
ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -n 1)
shape=4,8,8192,256,512,64
echo "== Nsight Compute: fused_fw_kernel at $shape $((SECONDS - t0)) s"
[ $((SECONDS - t0)) -lt ${NCU_BEFORE:-400} ] || { echo "no time left for ncu"; exit 0; }
timeout 50 "$ncu" --clock-control none -k regex:fused_fw_kernel --launch-skip 1 --launch-count 1 \
    --section SpeedOfLight --section Occupancy --section SchedulerStats --section WarpStateStats \
    --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
    python3 benchmarks/ncu_case.py --op forward --shape $shape > "$OUT/ncu.log" 2>&1
grep -E "^  [a-z_]+.*\(|Duration|Throughput|Eligible|Active Warps|Issued Warp|Occupancy|Warp Cycles|stalled" \
    "$OUT/ncu.log" | grep -v -E " 0(\.0+)?$" | head -60
rm -f "$OUT"/ptxas* "$OUT"/build*.log "$OUT"/nvidia-smi.txt "$OUT"/gc.log
echo "== end $((SECONDS - t0)) s"
