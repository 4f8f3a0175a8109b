#!/usr/bin/env bash
# Device calls of the thirteenth session (after check_fused_qn.sh landed both patches and widened the default plan).
#   PART=2: build the tree; every CUDA test, in four pytest processes side by side (the whole
#           suite in one process took over 240 s); then the tables against Triton (default plan).
#   device: PART=2 bash benchmarks/prepared/session13.sh > $OUT/s13.log 2>&1   (carry [".whl"])
set -uo pipefail
cd "$(dirname "$0")/../.."
export OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; t0=$SECONDS
left() { [ $((SECONDS - t0)) -lt "$1" ]; }
PART=${PART:-2}
MAX_JOBS=16 STAGES=build bash benchmarks/gpu_check.sh > "$OUT/gc.log" 2>&1; echo "tree build rc=$? $((SECONDS - t0)) s"
grep -iA2 "fused_fw" "$OUT/ptxas_resource_usage.txt" 2>/dev/null | grep -E "registers|spill" | head -8
export PYTHONPATH=/tmp/site
if [ "$PART" = 2 ]; then
  echo "== CUDA tests, four processes $((SECONDS - t0)) s"
  g=0
  for files in "tests/test_cuda_op.py tests/test_step_cuda.py tests/test_states_cuda.py" \
               "tests/test_backward.py tests/test_autograd.py" \
               "tests/test_hostile.py tests/test_chunkwise.py tests/test_fused_forward.py" \
               "tests/test_xlstm_backend.py tests/test_integration.py tests/test_deploy.py tests/test_errors.py tests/test_states.py tests/test_step.py tests/test_cpu_op.py tests/test_build_check.py"; do
    g=$((g + 1))
    ( timeout ${TEST_LIMIT:-270} python3 -m pytest -q $files -m cuda -p no:cacheprovider > "$OUT/pytest_g$g.log" 2>&1; echo "group $g rc=$? $((SECONDS - t0)) s: $(tail -1 "$OUT/pytest_g$g.log")" ) &
  done
  wait
  grep -hE "^(FAILED|ERROR)" "$OUT"/pytest_g*.log | head -20
  cat "$OUT"/pytest_g*.log > "$OUT/pytest.log"; rm -f "$OUT"/pytest_g*.log
  echo "== fused against the two kernels, one process $((SECONDS - t0)) s"
  left 380 && timeout 40 python3 benchmarks/ab_env.py MLSTM_EXT_FUSED_FW --old 0 --new 1 --op forward --rounds 2 \
      --out "$OUT/ab_fused_env.md" > /dev/null 2>&1; grep "^|" "$OUT/ab_fused_env.md" | head -8
  echo "== tables against Triton (default plan) $((SECONDS - t0)) s"
  left 400 && timeout 90 python3 benchmarks/bench_gpu.py --quick --tables forward,fwbw --out "$OUT/bench.md" > "$OUT/bench.log" 2>&1
  grep -A6 "^| (B" "$OUT/bench.md" 2>/dev/null | head -30
fi
rm -f "$OUT"/ptxas* "$OUT"/build*.log "$OUT"/nvidia-smi.txt "$OUT"/bench.png "$OUT"/bench.json "$OUT"/gc.log
echo "== end $((SECONDS - t0)) s"
