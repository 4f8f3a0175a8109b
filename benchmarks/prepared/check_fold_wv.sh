#!/usr/bin/env bash
# One device call (~6 minutes) for the prepared fused_fw_fold_wv.patch (benchmarks/NOTES.md,
# thirteenth session): the fused forward's 16-warp instances ((DHQK cap, chunk) = (256, 64), the
# default at xLSTM-7B's heads, and (128, 128), opt-in) fold the state update's weights into V once
# per block and chunk instead of into every warp's K fragments; a non-finite tile keeps the old
# steps. Builds main (.ab_main) beside main + the patch (the tree, in place), then on the tree:
# the fused forward's tests (every instance; hostile cases now at DHQK 200 too), racecheck and
# memcheck of the three instances, the fused kernel against the two kernels in one process (is
# chunk 128 now faster?), the same on four small grids (the default plan's 80% fill rule, landed
# untimed in the thirteenth session), the forward A/Bs main -> tree (default plan and
# MLSTM_EXT_FUSED_FW=1), the fw+bw A/B, and last the tables against Triton (default plan).
#   device: bash benchmarks/prepared/check_fold_wv.sh > $OUT/check.log 2>&1   (carry [".whl"])
set -uo pipefail
cd "$(dirname "$0")/../.."
export OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; t0=$SECONDS
left() { [ $((SECONDS - t0)) -lt "$1" ]; }
rm -rf .ab_main && mkdir -p .ab_main
tar --exclude=./.git --exclude='./.ab_*' --exclude=./build --exclude=./.whl --exclude='*.so' -cf - . | tar -xf - -C .ab_main
git apply benchmarks/prepared/fused_fw_fold_wv.patch || { echo "the patch does not apply"; exit 1; }
( cd .ab_main && MAX_JOBS=6 MLSTM_EXT_CUDA=1 python3 setup.py build_ext --inplace > "$OUT/b_main.log" 2>&1; echo ".ab_main build rc=$? $((SECONDS - t0)) s" ) &
MAX_JOBS=10 STAGES=build bash benchmarks/gpu_check.sh > "$OUT/gc.log" 2>&1; echo "tree build rc=$? $((SECONDS - t0)) s"
grep -A2 "fused_fw" "$OUT/ptxas_resource_usage.txt" 2>/dev/null | grep -E "regs|spill" | head -8
export PYTHONPATH=/tmp/site
echo "== fused tests (tree) $((SECONDS - t0)) s"
timeout 150 python3 -m pytest -q tests/test_fused_forward.py -p no:cacheprovider -rfE 2>&1 | grep -E "^(FAILED|ERROR)|passed|failed" | head -20
echo "== sanitizers (tree, the three instances) $((SECONDS - t0)) s"
for tool in racecheck memcheck; do
  MLSTM_EXT_FUSED_FW=1 PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 60 compute-sanitizer --tool $tool --error-exitcode 1 \
      python3 benchmarks/sanitize_case.py --cases forward_l64_bf16,forward_l64_d128_fp16,forward_bf16 2>&1 | tail -2
done
wait
M=.ab_main/mlstm_ext/_C.abi3.so; N=mlstm_ext/_C.abi3.so
ab() {  # NAME OP OLD NEW [env]
  echo "== A/B $1 $((SECONDS - t0)) s"
  env ${5:-} python3 benchmarks/bench_gpu.py --ab "$3,$4" --ab-op "$2" --rounds 2 > /dev/null 2>&1
  cp "$OUT/ab.md" "$OUT/$1.md" 2>/dev/null; grep -A6 "^| (B" "$OUT/$1.md"
}
echo "== fused against the two kernels, one process (tree) $((SECONDS - t0)) s"
left 330 && timeout 60 python3 benchmarks/ab_env.py MLSTM_EXT_FUSED_FW --old 0 --new 1 --op forward --rounds 2 \
    --out "$OUT/ab_fused_env.md" > /dev/null 2>&1; grep "^|" "$OUT/ab_fused_env.md" | head -8
echo "== the default plan's grid rule: fused against the two kernels on small grids (tree) $((SECONDS - t0)) s"
left 350 && timeout 40 python3 benchmarks/ab_env.py MLSTM_EXT_FUSED_FW --old 0 --new 1 --op forward --rounds 2 \
    --shapes "1,8,8192,256,512,64;2,8,8192,256,512,64;1,16,8192,128,128,64;4,16,4096,128,128,64" \
    --out "$OUT/ab_grid.md" > /dev/null 2>&1; grep "^|" "$OUT/ab_grid.md" | head -8
left 380 && ab ab_fw_main_tree forward "$M" "$N"
left 410 && ab ab_fw1_main_tree forward "$M" "$N" MLSTM_EXT_FUSED_FW=1
left 440 && ab ab_fwbw_main_tree fwbw "$M" "$N"
echo "== tables against Triton (tree, default plan) $((SECONDS - t0)) s"
left 480 && timeout 100 python3 benchmarks/bench_gpu.py --quick --tables forward,fwbw --out "$OUT/bench.md" > /dev/null 2>&1
grep -A6 "^| (B" "$OUT/bench.md" 2>/dev/null | head -16
rm -f "$OUT"/ptxas* "$OUT"/build*.log "$OUT"/b_*.log "$OUT"/gc.log "$OUT"/nvidia-smi.txt "$OUT"/ab.md "$OUT"/ab.json \
      "$OUT"/bench.json "$OUT"/bench.png
echo "== end $((SECONDS - t0)) s"
