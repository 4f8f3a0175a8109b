#!/usr/bin/env bash
# The seventeenth session's device check (~8 minutes; carry [".whl", ".ab_base"]): bw_post's state
# products through a ring of four slots at L = 128 (three steps in flight), and the forward's two
# kernels at chunk 128 (the sixteenth session's patch, committed on this branch).
# .ab_base holds main before both (git archive cc7074f setup.py pyproject.toml README.md LICENSE
# csrc mlstm_ext). Builds both side by side; the CUDA tests the changes touch, racecheck and
# memcheck of the backward's sanitizer cases (beside the tests); forward + backward A/B old -> new;
# MLSTM_EXT_BW_AHEAD 2 -> 3 in one process; forward + backward against Triton.
#   device: bash benchmarks/prepared/check_s17.sh > $OUT/s17.log 2>&1
# LIGHT=1 (~6 minutes: the second call, on the branch with the grams through four buffer pairs,
# .ab_base then holding c05685e): test_backward only, no MLSTM_EXT_BW_AHEAD A/B.
set -uo pipefail
cd "$(dirname "$0")/../.."
export OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; t0=$SECONDS
( cd .ab_base && MAX_JOBS=8 MLSTM_EXT_CUDA=1 timeout 300 python3 setup.py build_ext --inplace > "$OUT/build_old.log" 2>&1
  echo "build old rc=$? $((SECONDS - t0)) s" ) &
MAX_JOBS=8 STAGES=build bash benchmarks/gpu_check.sh > "$OUT/gc.log" 2>&1; rc=$?; echo "build new rc=$rc $((SECONDS - t0)) s"
wait
[ $rc = 0 ] || { tail -30 "$OUT/gc.log"; grep -B2 -A8 "error" "$OUT/build.log" | head -60; exit 1; }
grep -q "Error\|error:" "$OUT/build_old.log" && tail -20 "$OUT/build_old.log"
grep -A2 "bw_post" "$OUT/ptxas_resource_usage.txt" 2>/dev/null | grep -E "registers|spill" | head -8
export PYTHONPATH=/tmp/site
pt() { timeout 150 python3 -m pytest -q -p no:cacheprovider -rxX "$@" 2>&1; }
pt tests/test_backward.py -m cuda > "$OUT/t_bw.log" &
if [ "${LIGHT:-0}" != 1 ]; then
  pt tests/test_fused_forward.py -k "default or two_kernels" > "$OUT/t_fw.log" &
  pt tests/test_chunkwise.py tests/test_hostile.py tests/test_autograd.py -m cuda > "$OUT/t_ch.log" &
fi
CS=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
SC="backward_fp16_l128,backward_bf16"
timeout 150 "$CS" --tool racecheck --racecheck-report all --error-exitcode 1 python3 benchmarks/sanitize_case.py --cases $SC \
    > "$OUT/racecheck.log" 2>&1; echo "racecheck rc=$? $((SECONDS - t0)) s"
PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 100 "$CS" --tool memcheck --error-exitcode 1 --leak-check no \
    python3 benchmarks/sanitize_case.py --cases $SC > "$OUT/memcheck.log" 2>&1; echo "memcheck rc=$? $((SECONDS - t0)) s"
wait
for f in t_bw t_fw t_ch; do [ -f "$OUT/$f.log" ] || continue; echo "== $f"; grep -E "passed|failed|^E |XPASS|Error" "$OUT/$f.log" | tail -6; done
grep -E "ERROR SUMMARY|RACECHECK SUMMARY|hazard" "$OUT/racecheck.log" "$OUT/memcheck.log" | head -6
echo "tests done $((SECONDS - t0)) s"
old=$(find .ab_base/mlstm_ext -maxdepth 1 -name '_C*.so' | head -n 1); new=$(find mlstm_ext -maxdepth 1 -name '_C*.so' | head -n 1)
timeout 150 python3 benchmarks/bench_gpu.py --ab "$(realpath "$old"),$(realpath "$new")" --ab-op fwbw --quick --rounds 2 \
    --out "$OUT/ab.md" > "$OUT/ab.log" 2>&1; echo "ab rc=$? $((SECONDS - t0)) s"
grep -E "^\| \(" "$OUT/ab.md" | cut -d'|' -f2-6
if [ "${LIGHT:-0}" != 1 ]; then
  timeout 80 python3 benchmarks/ab_env.py MLSTM_EXT_BW_AHEAD --old 2 --new 3 --rounds 2 --out "$OUT/ahead.md" > /dev/null 2>&1
  echo "ahead rc=$? $((SECONDS - t0)) s"; grep -E "^\| \(" "$OUT/ahead.md" | cut -d'|' -f2-6
fi
if [ "${TABLES:-1}" = 1 ] && [ $((SECONDS - t0)) -lt 460 ]; then
  timeout $((580 - (SECONDS - t0))) python3 benchmarks/bench_gpu.py --quick --tables "${TABLE_LIST:-fwbw}" --out "$OUT/bench.md" > "$OUT/bench.log" 2>&1
  echo "bench rc=$? $((SECONDS - t0)) s"; grep -A6 "^| (B" "$OUT/bench.md" 2>/dev/null | head -16
fi
rm -f "$OUT"/ptxas* "$OUT"/nvidia-smi.txt "$OUT"/gc.log "$OUT"/build.log
echo "== end $((SECONDS - t0)) s"
