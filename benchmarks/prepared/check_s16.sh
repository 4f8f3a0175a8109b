#!/usr/bin/env bash
# Sixteenth session's device call (~5 minutes; carry [".whl"]): which chunk size each pass runs
# fastest at (benchmarks/chunk_choice.py), the backward's CUDA tests with its chunk plan
# (planned_backward_chunk), then forward + backward against Triton with the plan.
#   device: bash benchmarks/prepared/check_s16.sh > $OUT/s16.log 2>&1
set -uo pipefail
cd "$(dirname "$0")/../.."
export OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; t0=$SECONDS
MAX_JOBS=16 STAGES=build bash benchmarks/gpu_check.sh > "$OUT/gc.log" 2>&1; echo "build rc=$? $((SECONDS - t0)) s"
export PYTHONPATH=/tmp/site
timeout 150 python3 benchmarks/chunk_choice.py > "$OUT/chunk.md" 2>&1; echo "chunk_choice rc=$? $((SECONDS - t0)) s"
cat "$OUT/chunk.md"
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_backward.py -m cuda > "$OUT/tests.log" 2>&1
echo "tests rc=$? $((SECONDS - t0)) s"; grep -E "passed|failed|Error|assert" "$OUT/tests.log" | tail -15
timeout 120 python3 benchmarks/bench_gpu.py --quick --tables fwbw --out "$OUT/bench.md" > "$OUT/bench.log" 2>&1
echo "bench rc=$? $((SECONDS - t0)) s"; grep -A6 "^| (B" "$OUT/bench.md" 2>/dev/null | head -12
rm -f "$OUT"/ptxas* "$OUT"/nvidia-smi.txt "$OUT"/gc.log "$OUT"/build.log
echo "== end $((SECONDS - t0)) s"
