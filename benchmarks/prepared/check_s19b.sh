#!/usr/bin/env bash
# Nineteenth session, call 2 (~5 minutes; carry [".whl", ".ab_qc"]): the tree with the fused
# forward's lo-first state update at (DHQK 128, chunk 64) (FusedFwTraits::kLoFirst; its SASS is
# the LO_FIRST=1 build's that call 1 timed, the other instances main's): build, the fused
# forward's CUDA tests and the forward paths' (chunkwise, hostile, autograd), then, as time
# allows, an A/B of the prepared fused_fw_qc_grouped.patch (.ab_qc = the tree with it, built
# with -DMLSTM_EXT_FUSED_QC_GROUPED=1) and the forward against Triton.
#   device: BUDGET=260 bash benchmarks/prepared/check_s19b.sh > $OUT/s19b.log 2>&1
set -uo pipefail
cd "$(dirname "$0")/../.."
export OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; t0=$SECONDS
left() { echo $((${BUDGET:-260} - (SECONDS - t0))); }
if [ -f .ab_qc/setup.py ]; then
  ( cd .ab_qc && MAX_JOBS=6 MLSTM_EXT_CUDA=1 NVCC_APPEND_FLAGS="-DMLSTM_EXT_FUSED_QC_GROUPED=1" timeout 200 \
      python3 setup.py build_ext --inplace > "$OUT/build_qc.log" 2>&1; echo "build qc rc=$? $((SECONDS - t0)) s" ) &
fi
MAX_JOBS=10 STAGES="wheels build" bash benchmarks/gpu_check.sh > "$OUT/gc.log" 2>&1; rc=$?; echo "build rc=$rc $((SECONDS - t0)) s"
[ $rc = 0 ] || { tail -30 "$OUT/gc.log"; exit 1; }
export PYTHONPATH=/tmp/site
pt() { timeout "${TEST_S:-150}" python3 -m pytest -q -p no:cacheprovider -rxX "$@" 2>&1; echo "rc=$?"; }
pt tests/test_fused_forward.py > "$OUT/t_ff.log" &
pt tests/test_chunkwise.py tests/test_hostile.py tests/test_autograd.py -m cuda > "$OUT/t_fw.log" &
wait
for f in t_ff t_fw; do echo "== $f"; grep -E "passed|failed|^E |XPASS|Error|^rc=" "$OUT/$f.log" | tail -5; done
lib() { realpath "$(find "$1/mlstm_ext" -maxdepth 1 -name '_C*.so' | head -n 1)"; }
if [ "$(left)" -gt 45 ] && [ -n "$(find .ab_qc/mlstm_ext -maxdepth 1 -name '_C*.so' 2>/dev/null)" ]; then
  timeout $(($(left) - 5)) python3 benchmarks/bench_gpu.py --ab "$(lib .),$(lib .ab_qc)" --ab-op forward --quick \
      --rounds 2 > "$OUT/ab_qc.log" 2>&1; echo "ab qc rc=$? $((SECONDS - t0)) s"; grep -E "^\| \(" "$OUT/ab_qc.log" | cut -d'|' -f2-7
fi
if [ "$(left)" -gt 50 ]; then
  timeout $(($(left) - 5)) python3 benchmarks/bench_gpu.py --quick --tables forward --out "$OUT/bench_fw.md" > "$OUT/bench_fw.log" 2>&1
  echo "bench forward rc=$? $((SECONDS - t0)) s"; grep -A6 "^| (B" "$OUT/bench_fw.md" 2>/dev/null | head -8
fi
rm -f "$OUT"/ptxas* "$OUT"/nvidia-smi.txt "$OUT"/build.log
echo "== end $((SECONDS - t0)) s"
