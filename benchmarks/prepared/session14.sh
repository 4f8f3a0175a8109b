#!/usr/bin/env bash
# The fourteenth session's second device call (after check_fold_wv.sh): the tree with chunk 128 run
# as chunk 64 by the default plan (the fold patch left out: it measured neutral).
#   build; every CUDA test in four pytest processes side by side; Nsight Compute on the fused
#   forward at two shapes (what its 16-warp instance waits on: cutting 13.5% of its instructions
#   saved 0.5%); the tables against Triton (default plan).
#   device: bash benchmarks/prepared/session14.sh > $OUT/s14.log 2>&1   (carry [".whl"])
set -uo pipefail
cd "$(dirname "$0")/../.."
export OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; t0=$SECONDS
left() { [ $((SECONDS - t0)) -lt "$1" ]; }
MAX_JOBS=16 STAGES=build bash benchmarks/gpu_check.sh > "$OUT/gc.log" 2>&1; echo "tree build rc=$? $((SECONDS - t0)) s"
export PYTHONPATH=/tmp/site
echo "== CUDA tests, four processes $((SECONDS - t0)) s"
g=0
for files in "tests/test_cuda_op.py tests/test_step_cuda.py tests/test_states_cuda.py" \
             "tests/test_autograd.py tests/test_backward.py" \
             "tests/test_fused_forward.py tests/test_chunkwise.py tests/test_hostile.py" \
             "tests/test_xlstm_backend.py tests/test_integration.py tests/test_deploy.py tests/test_errors.py tests/test_states.py tests/test_step.py tests/test_cpu_op.py tests/test_build_check.py"; do
  g=$((g + 1))
  ( timeout ${TEST_LIMIT:-220} python3 -m pytest -q $files -m cuda -p no:cacheprovider > "$OUT/pytest_g$g.log" 2>&1; echo "group $g rc=$? $((SECONDS - t0)) s: $(tail -1 "$OUT/pytest_g$g.log")" ) &
done
wait
grep -hE "^(FAILED|ERROR)" "$OUT"/pytest_g*.log | head -20
cat "$OUT"/pytest_g*.log > "$OUT/pytest.log"; rm -f "$OUT"/pytest_g*.log
echo "== tables against Triton (default plan) $((SECONDS - t0)) s"
left 330 && timeout 70 python3 benchmarks/bench_gpu.py --quick --tables forward,fwbw --out "$OUT/bench.md" > "$OUT/bench.log" 2>&1
grep -A6 "^| (B" "$OUT/bench.md" 2>/dev/null | head -30
echo "== Nsight Compute: the fused forward $((SECONDS - t0)) s"
ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -n 1)
for shape in 4,8,8192,256,512,64 8,16,4096,128,128,64; do
  left 380 || break
  echo "-- fused_fw_kernel at $shape" | tee -a "$OUT/ncu.txt"
  timeout 45 "$ncu" --clock-control none -k regex:fused_fw_kernel --launch-skip 1 --launch-count 1 \
      --section SpeedOfLight --section Occupancy --section SchedulerStats --section WarpStateStats --section MemoryWorkloadAnalysis \
      --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
      python3 benchmarks/ncu_case.py --op forward --shape $shape > "$OUT/ncu_$shape.log" 2>&1
  grep -E "^  [a-z_]+.*\(|Duration|Throughput|Eligible|Active Warps|Issued Warp|Occupancy|Warp Cycles|stalled|Hit Rate|Bandwidth" \
      "$OUT/ncu_$shape.log" | grep -v -E " 0(\.0+)?$" | tee -a "$OUT/ncu.txt" | head -60
  rm -f "$OUT/ncu_$shape.log"
done
rm -f "$OUT"/ptxas* "$OUT"/build*.log "$OUT"/nvidia-smi.txt "$OUT"/bench.png "$OUT"/bench.json "$OUT"/gc.log
echo "== end $((SECONDS - t0)) s"
