#!/usr/bin/env bash
# Nineteenth session, call 2 (~6 minutes; carry [".whl"]): the tree with the fused forward's
# lo-first state update at (DHQK 128, chunk 64) (FusedFwTraits::kLoFirst; its SASS is the
# LO_FIRST=1 build's that call 1 timed, the other instances main's): build, the fused forward's
# and the backward's CUDA tests (two processes), then forward and forward + backward against
# Triton.
#   device: BUDGET=400 bash benchmarks/prepared/check_s19b.sh > $OUT/s19b.log 2>&1
set -uo pipefail
cd "$(dirname "$0")/../.."
export OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; t0=$SECONDS
left() { echo $((${BUDGET:-400} - (SECONDS - t0))); }
MAX_JOBS=16 STAGES="wheels build" bash benchmarks/gpu_check.sh > "$OUT/gc.log" 2>&1; rc=$?; echo "build rc=$rc $((SECONDS - t0)) s"
[ $rc = 0 ] || { tail -30 "$OUT/gc.log"; exit 1; }
export PYTHONPATH=/tmp/site
pt() { timeout "${TEST_S:-200}" python3 -m pytest -q -p no:cacheprovider -rxX "$@" 2>&1; echo "rc=$?"; }
pt tests/test_fused_forward.py > "$OUT/t_ff.log" &
pt tests/test_backward.py -m cuda > "$OUT/t_bw.log" &
wait
for f in t_ff t_bw; do echo "== $f"; grep -E "passed|failed|^E |XPASS|Error|^rc=" "$OUT/$f.log" | tail -5; done
for tb in forward fwbw; do
  [ "$(left)" -gt 50 ] || break
  timeout $(($(left) - 5)) python3 benchmarks/bench_gpu.py --quick --tables $tb --out "$OUT/bench_$tb.md" > "$OUT/bench_$tb.log" 2>&1
  echo "bench $tb rc=$? $((SECONDS - t0)) s"; grep -A6 "^| (B" "$OUT/bench_$tb.md" 2>/dev/null | head -16
done
rm -f "$OUT"/ptxas* "$OUT"/nvidia-smi.txt "$OUT"/build.log
echo "== end $((SECONDS - t0)) s"
