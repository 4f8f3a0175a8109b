#!/usr/bin/env bash
# One device call (~7 minutes) for the two prepared patches of the thirteenth session
# (benchmarks/NOTES.md), applied in this order:
#   fused_fw_fold_wv.patch         the fused forward's 16-warp instances ((DHQK cap, chunk) =
#                                  (256, 64), the default at xLSTM-7B's heads, and (128, 128),
#                                  opt-in) fold the state update's weights into V once per block
#                                  and chunk; a non-finite tile keeps the old steps;
#   fused_fw_chunk128_as_64.patch  the default plan runs chunk 128 as chunk 64 (the same function
#                                  up to rounding).
# Builds main (.ab_main) and main + the first (.ab_fold) beside main + both (the tree, in place),
# then on the tree: the fused forward's tests (hostile cases at DHQK 200, the default chunk 128
# against the chain, the two kernels and hostile inputs), racecheck and memcheck of the three
# instances, the fused kernel against the two kernels in one process (MLSTM_EXT_FUSED_FW=1: is
# chunk 128's own instance faster now?), the same on four small grids (the default plan's 80% fill
# rule, landed untimed), the forward A/Bs main -> fold -> tree (default plan), main -> fold with
# MLSTM_EXT_FUSED_FW=1, the fw+bw A/B main -> tree, and last the tables against Triton.
#   device: bash benchmarks/prepared/check_fold_wv.sh > $OUT/check.log 2>&1   (carry [".whl"])
set -uo pipefail
cd "$(dirname "$0")/../.."
export OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; t0=$SECONDS
left() { [ $((SECONDS - t0)) -lt "$1" ]; }
for d in .ab_main .ab_fold; do
  rm -rf "$d" && mkdir -p "$d"
  tar --exclude=./.git --exclude='./.ab_*' --exclude=./build --exclude=./.whl --exclude='*.so' -cf - . | tar -xf - -C "$d"
done
git apply --directory=.ab_fold benchmarks/prepared/fused_fw_fold_wv.patch || { echo "fold does not apply (.ab_fold)"; exit 1; }
git apply benchmarks/prepared/fused_fw_fold_wv.patch || { echo "fold does not apply"; exit 1; }
git apply benchmarks/prepared/fused_fw_chunk128_as_64.patch || { echo "chunk128_as_64 does not apply"; exit 1; }
for d in .ab_main .ab_fold; do
  ( cd "$d" && MAX_JOBS=5 MLSTM_EXT_CUDA=1 python3 setup.py build_ext --inplace > "$OUT/b_$d.log" 2>&1; echo "$d build rc=$? $((SECONDS - t0)) s" ) &
done
MAX_JOBS=6 STAGES=build bash benchmarks/gpu_check.sh > "$OUT/gc.log" 2>&1; echo "tree build rc=$? $((SECONDS - t0)) s"
grep -A2 "fused_fw" "$OUT/ptxas_resource_usage.txt" 2>/dev/null | grep -E "regs|spill" | head -8
export PYTHONPATH=/tmp/site
echo "== fused tests (tree) $((SECONDS - t0)) s"
timeout 170 python3 -m pytest -q tests/test_fused_forward.py -p no:cacheprovider -rfE 2>&1 | grep -E "^(FAILED|ERROR)|passed|failed" | head -24
echo "== sanitizers (tree, the three instances) $((SECONDS - t0)) s"
for tool in racecheck memcheck; do
  MLSTM_EXT_FUSED_FW=1 PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 60 compute-sanitizer --tool $tool --error-exitcode 1 \
      python3 benchmarks/sanitize_case.py --cases forward_l64_bf16,forward_l64_d128_fp16,forward_bf16 2>&1 | tail -2
done
wait
M=.ab_main/mlstm_ext/_C.abi3.so; F=.ab_fold/mlstm_ext/_C.abi3.so; N=mlstm_ext/_C.abi3.so
ab() {  # NAME OP OLD NEW [env]
  echo "== A/B $1 $((SECONDS - t0)) s"
  env ${5:-} python3 benchmarks/bench_gpu.py --ab "$3,$4" --ab-op "$2" --rounds 2 > /dev/null 2>&1
  cp "$OUT/ab.md" "$OUT/$1.md" 2>/dev/null; grep -A6 "^| (B" "$OUT/$1.md"
}
echo "== fused (own instances) against the two kernels, one process (tree) $((SECONDS - t0)) s"
left 360 && timeout 60 python3 benchmarks/ab_env.py MLSTM_EXT_FUSED_FW --old 0 --new 1 --op forward --rounds 2 \
    --out "$OUT/ab_fused_env.md" > /dev/null 2>&1; grep "^|" "$OUT/ab_fused_env.md" | head -8
echo "== the default plan's grid rule: fused against the two kernels on small grids (tree) $((SECONDS - t0)) s"
left 380 && timeout 40 python3 benchmarks/ab_env.py MLSTM_EXT_FUSED_FW --old 0 --new 1 --op forward --rounds 2 \
    --shapes "1,8,8192,256,512,64;2,8,8192,256,512,64;1,16,8192,128,128,64;4,16,4096,128,128,64" \
    --out "$OUT/ab_grid.md" > /dev/null 2>&1; grep "^|" "$OUT/ab_grid.md" | head -8
left 400 && ab ab_fw_main_fold forward "$M" "$F"
left 420 && ab ab_fw_fold_tree forward "$F" "$N"
left 440 && ab ab_fw1_main_fold forward "$M" "$F" MLSTM_EXT_FUSED_FW=1
left 460 && ab ab_fwbw_main_tree fwbw "$M" "$N"
echo "== tables against Triton (tree, default plan) $((SECONDS - t0)) s"
left 500 && timeout 95 python3 benchmarks/bench_gpu.py --quick --tables forward,fwbw --out "$OUT/bench.md" > /dev/null 2>&1
grep -A6 "^| (B" "$OUT/bench.md" 2>/dev/null | head -16
rm -f "$OUT"/ptxas* "$OUT"/build*.log "$OUT"/b_*.log "$OUT"/gc.log "$OUT"/nvidia-smi.txt "$OUT"/ab.md "$OUT"/ab.json \
      "$OUT"/bench.json "$OUT"/bench.png
echo "== end $((SECONDS - t0)) s"
