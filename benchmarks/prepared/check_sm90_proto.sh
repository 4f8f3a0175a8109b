#!/usr/bin/env bash
# One device call (~8-9 minutes; the A/Bs stop at 500 s) for the prepared warpgroup-MMA fused forward
# (fused_fw_sm90_proto.patch; benchmarks/NOTES.md, fourteenth session): build main + the patch;
# the prototype's tests (MLSTM_EXT_FUSED_FW=2 and 3: the H rows on wgmma, built for two blocks per
# SM / one; 4 and 5: the state update on wgmma too) and the fused forward's others; racecheck and
# memcheck of =2 and =4 at DHQK 72 and 200; then, in one process, the mma.sync fused kernel (=1)
# against each variant at four grids of DHQK <= 128, and (=2, =4) at (4, 8, 8192, 256, 512, 64).
#   device: bash benchmarks/prepared/check_sm90_proto.sh > $OUT/proto.log 2>&1   (carry [".whl"])
set -uo pipefail
cd "$(dirname "$0")/../.."
export OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; t0=$SECONDS
left() { [ $((SECONDS - t0)) -lt "$1" ]; }
git apply benchmarks/prepared/fused_fw_sm90_proto.patch || { echo "the patch does not apply"; exit 1; }
MAX_JOBS=16 STAGES=build bash benchmarks/gpu_check.sh > "$OUT/gc.log" 2>&1; echo "build rc=$? $((SECONDS - t0)) s"
grep -A2 "fused_fw_sm90" "$OUT/ptxas_resource_usage.txt" 2>/dev/null | grep -E "registers|spill" | head -4
export PYTHONPATH=/tmp/site
echo "== tests $((SECONDS - t0)) s"
timeout 150 python3 -m pytest -q tests/test_fused_forward.py -p no:cacheprovider -rfE -k sm90 2>&1 | grep -E "^(FAILED|ERROR)|passed|failed|Error" | head -12
timeout 120 python3 -m pytest -q tests/test_fused_forward.py -p no:cacheprovider -rfE -k "not sm90" 2>&1 | grep -E "^(FAILED|ERROR)|passed|failed" | head -8
echo "== sanitizers (the two-block builds; the one-block ones differ only in registers) $((SECONDS - t0)) s"
for v in 2 4; do
  for tool in racecheck memcheck; do
    MLSTM_EXT_FUSED_FW=$v PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 60 compute-sanitizer --tool $tool --error-exitcode 1 \
        python3 benchmarks/sanitize_case.py --cases forward_l64_d72_bf16,forward_l64_bf16 2>&1 | tail -3
  done
done
echo "== mma.sync (=1) against the prototype (=2 .. =5), one process $((SECONDS - t0)) s"
S="8,16,4096,128,128,64;4,16,4096,128,128,64;2,8,8192,128,128,64;8,16,4096,64,64,64"
for v in 2 4 3 5; do
  shapes=$S
  case $v in 2|4) shapes="$S;4,8,8192,256,512,64" ;; esac  # DHQK 256: one build, one block per SM
  left 500 && timeout 60 python3 benchmarks/ab_env.py MLSTM_EXT_FUSED_FW --old 1 --new $v --op forward --rounds 2 \
      --shapes "$shapes" --out "$OUT/ab_proto_$v.md" > /dev/null 2>&1; grep "^|" "$OUT/ab_proto_$v.md" | head -8
done
rm -f "$OUT"/ptxas* "$OUT"/build*.log "$OUT"/nvidia-smi.txt "$OUT"/gc.log
echo "== end $((SECONDS - t0)) s"
