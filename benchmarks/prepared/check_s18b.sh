#!/usr/bin/env bash
# The same-call A/B the eighteenth session could not run (its device time ran out; ~5 minutes;
# carry [".whl", ".ab_base"]): the states kernel's products with every V fragment loaded first
# (state_kstep's kZeroPadded, landed) alone against main before it. .ab_base: git archive 26e7e81
# setup.py pyproject.toml README.md LICENSE csrc mlstm_ext. (Its first check, check_s18.sh on
# branch s18-gram-states, measured it bundled with the gram scan's wider blocks, since dropped.)
# Builds both side by side; the CUDA tests of the states kernel and the backward; forward +
# backward and forward A/B old -> new; forward + backward and forward against Triton.
#   device: BUDGET=260 bash benchmarks/prepared/check_s18b.sh > $OUT/s18b.log 2>&1
set -uo pipefail
cd "$(dirname "$0")/../.."
export OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; t0=$SECONDS
left() { echo $((${BUDGET:-290} - (SECONDS - t0))); }
( cd .ab_base && MAX_JOBS=8 MLSTM_EXT_CUDA=1 timeout 200 python3 setup.py build_ext --inplace > "$OUT/build_old.log" 2>&1
  echo "build old rc=$? $((SECONDS - t0)) s" ) &
MAX_JOBS=8 STAGES="wheels build" bash benchmarks/gpu_check.sh > "$OUT/gc.log" 2>&1; rc=$?; echo "build new rc=$rc $((SECONDS - t0)) s"
wait
[ $rc = 0 ] || { tail -30 "$OUT/gc.log"; grep -B2 -A8 "error" "$OUT/build.log" | head -60; exit 1; }
export PYTHONPATH=/tmp/site
if [ "${TESTS:-1}" = 1 ]; then
  pt() { timeout 90 python3 -m pytest -q -p no:cacheprovider -rxX "$@" 2>&1; }
  pt tests/test_backward.py -m cuda > "$OUT/t_bw.log" &
  pt tests/test_states_cuda.py > "$OUT/t_st.log" &
  wait
  for f in t_bw t_st; do echo "== $f"; grep -E "passed|failed|^E |XPASS|Error" "$OUT/$f.log" | tail -4; done
fi
old=$(find .ab_base/mlstm_ext -maxdepth 1 -name '_C*.so' | head -n 1); new=$(find mlstm_ext -maxdepth 1 -name '_C*.so' | head -n 1)
for op in fwbw forward; do
  [ "$(left)" -gt 40 ] || break
  timeout $(($(left) - 5)) python3 benchmarks/bench_gpu.py --ab "$(realpath "$old"),$(realpath "$new")" --ab-op $op --quick \
      --rounds 2 --out "$OUT/ab_$op.md" > "$OUT/ab_$op.log" 2>&1; echo "ab $op rc=$? $((SECONDS - t0)) s"
  grep -E "^\| \(" "$OUT/ab_$op.md" | cut -d'|' -f2-6
done
if [ "$(left)" -gt 90 ]; then
  timeout $(($(left) - 5)) python3 benchmarks/bench_gpu.py --quick --tables fwbw,forward --out "$OUT/bench.md" > "$OUT/bench.log" 2>&1
  echo "bench rc=$? $((SECONDS - t0)) s"; grep -A6 "^| (B" "$OUT/bench.md" 2>/dev/null | head -24
fi
rm -f "$OUT"/ptxas* "$OUT"/nvidia-smi.txt "$OUT"/build.log
echo "== end $((SECONDS - t0)) s"
