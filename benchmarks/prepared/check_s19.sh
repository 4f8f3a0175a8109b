#!/usr/bin/env bash
# Nineteenth session, call 1 (~8 minutes; carry [".whl", ".ab_base", ".ab_lo"]):
#   .ab_base = git archive 26e7e81 (main before the states kernel's lo-first k-step),
#   .ab_lo   = git archive HEAD, built with -DMLSTM_EXT_FUSED_LO_FIRST=1.
# Three builds side by side; the states / backward CUDA tests on the tree and the fused forward's
# on the LO_FIRST build; A/B old -> tree (fwbw); bw_post's L2 eviction hints (MLSTM_EXT_BW_L2HINT
# 0 -> 2, 4, 6, 3, 1, one process); A/B old -> tree (forward), tree -> LO_FIRST (forward); the tables
# against Triton (fwbw, forward).
# Ran (BUDGET=520) on c9ea898 plus branch s19-l2hint's plumbing: MLSTM_EXT_BW_L2HINT exists only
# there, so on main its l2 rows time one build against itself.
#   device: BUDGET=520 bash benchmarks/prepared/check_s19.sh > $OUT/s19.log 2>&1
set -uo pipefail
cd "$(dirname "$0")/../.."
export OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; t0=$SECONDS
left() { echo $((${BUDGET:-520} - (SECONDS - t0))); }
b() { ( cd "$1" && MAX_JOBS=6 MLSTM_EXT_CUDA=1 NVCC_APPEND_FLAGS="${2:-}" timeout 240 python3 setup.py build_ext --inplace > "$OUT/build_$3.log" 2>&1
        echo "build $3 rc=$? $((SECONDS - t0)) s" ); }
b .ab_base "" old &
b .ab_lo "-DMLSTM_EXT_FUSED_LO_FIRST=1" lo &
MAX_JOBS=6 STAGES="wheels build" bash benchmarks/gpu_check.sh > "$OUT/gc.log" 2>&1; rc=$?; echo "build new rc=$rc $((SECONDS - t0)) s"
wait
[ $rc = 0 ] || { tail -30 "$OUT/gc.log"; grep -B2 -A8 "error" "$OUT/build.log" | head -60; exit 1; }
export PYTHONPATH=/tmp/site
lib() { realpath "$(find "$1/mlstm_ext" -maxdepth 1 -name '_C*.so' | head -n 1)"; }
old=$(lib .ab_base); new=$(lib .); lo=$(lib .ab_lo)
if [ "${TESTS:-1}" = 1 ]; then
  pt() { timeout 100 python3 -m pytest -q -p no:cacheprovider -rxX "$@" 2>&1; }
  pt tests/test_backward.py -m cuda > "$OUT/t_bw.log" &
  pt tests/test_states_cuda.py > "$OUT/t_st.log" &
  MLSTM_EXT_LIBRARY=$lo pt tests/test_fused_forward.py -x > "$OUT/t_lo.log" &
  MLSTM_EXT_BW_L2HINT=2 pt tests/test_backward.py -m cuda > "$OUT/t_l2.log" &
  wait
  for f in t_bw t_st t_lo t_l2; do echo "== $f"; grep -E "passed|failed|^E |XPASS|Error" "$OUT/$f.log" | tail -4; done
fi
abr() {  # OLD NEW OP TAG
  [ "$(left)" -gt 40 ] || return
  timeout $(($(left) - 5)) python3 benchmarks/bench_gpu.py --ab "$1,$2" --ab-op $3 --quick \
      --rounds 2 > "$OUT/ab_$4.log" 2>&1; echo "ab $4 rc=$? $((SECONDS - t0)) s"
  grep -E "^\| \(" "$OUT/ab_$4.log" | cut -d'|' -f2-6  # --ab writes its table to the log and $OUT/ab.md
}
abr "$old" "$new" fwbw fwbw
l2() {  # HINT: bw_post's L2 policies (MLSTM_EXT_BW_L2HINT) 0 -> HINT, forward + backward, one process
  [ "$(left)" -gt 40 ] || return
  timeout $(($(left) - 5)) python3 benchmarks/ab_env.py MLSTM_EXT_BW_L2HINT --old 0 --new $1 --rounds 3 \
      --out "$OUT/l2_$1.md" > "$OUT/l2_$1.log" 2>&1; echo "l2hint $1 rc=$? $((SECONDS - t0)) s"
  grep -E "^\| \(" "$OUT/l2_$1.md" | cut -d'|' -f2-7
}
l2 2
l2 6
# Nsight Compute on one bw_post launch per L2 hint: DRAM bytes, L2 hit rate, duration.
ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -n 1)
for h in 0 2 6; do
  [ "$(left)" -gt 45 ] && [ -n "$ncu" ] || break
  MLSTM_EXT_BW_L2HINT=$h timeout 40 "$ncu" -k regex:bw_post --launch-skip 1 --launch-count 1 \
      --metrics gpu__time_duration.sum,dram__bytes_read.sum,lts__t_sector_hit_rate.pct,dram__throughput.avg.pct_of_peak_sustained_elapsed,lts__t_sectors.avg.pct_of_peak_sustained_elapsed \
      python3 benchmarks/ncu_case.py --op bw --shape 1,8,16384,256,512,128 > "$OUT/ncu_$h.txt" 2>&1
  echo "== ncu bw_post L2HINT=$h"; grep -E "gpu__time|dram__|lts__" "$OUT/ncu_$h.txt"
done
if [ "$(left)" -gt 90 ]; then
  timeout $(($(left) - 5)) python3 benchmarks/bench_gpu.py --quick --tables fwbw,forward --out "$OUT/bench.md" > "$OUT/bench.log" 2>&1
  echo "bench rc=$? $((SECONDS - t0)) s"; grep -A6 "^| (B" "$OUT/bench.md" 2>/dev/null | head -24
fi
abr "$new" "$lo" forward lofirst
l2 4
l2 3
l2 1
abr "$old" "$new" forward forward
rm -f "$OUT"/ptxas* "$OUT"/nvidia-smi.txt "$OUT"/build.log
echo "== end $((SECONDS - t0)) s"
