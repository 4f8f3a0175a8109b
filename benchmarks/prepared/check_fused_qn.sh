#!/usr/bin/env bash
# One device call (~5 minutes) for fused_fw_qn_mma.patch (benchmarks/NOTES.md, twelfth session):
# the fused forward sums q . n_k on the tensor cores (n_k as three exact bf16 terms in the pad of
# C_k's shared rows) instead of a scalar loop. Builds main (.ab_main, copied from the working tree
# here) beside main + the patch (applied in place), then: the fused forward's tests and
# sanitizers on the patched tree (every instance), the forward A/B main -> tree with the default
# plan and with MLSTM_EXT_FUSED_FW=1, the fw+bw A/B, and the fused kernel against the two kernels
# in one process.
#   device: bash benchmarks/prepared/check_fused_qn.sh > $OUT/check.log 2>&1   (carry [".whl"])
set -uo pipefail
cd "$(dirname "$0")/../.."
export OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; t0=$SECONDS
left() { [ $((SECONDS - t0)) -lt "$1" ]; }
rm -rf .ab_main && mkdir -p .ab_main
tar --exclude=./.git --exclude='./.ab_*' --exclude=./build --exclude=./.whl --exclude='*.so' -cf - . | tar -xf - -C .ab_main
git apply benchmarks/prepared/fused_fw_qn_mma.patch || { echo "the patch does not apply"; exit 1; }
( cd .ab_main && MAX_JOBS=6 MLSTM_EXT_CUDA=1 python3 setup.py build_ext --inplace > "$OUT/b_main.log" 2>&1; echo "main build rc=$? $((SECONDS - t0)) s" ) &
MAX_JOBS=10 STAGES=build bash benchmarks/gpu_check.sh > "$OUT/gc.log" 2>&1; echo "tree build rc=$? $((SECONDS - t0)) s"
grep -A2 "fused_fw" "$OUT/ptxas_resource_usage.txt" 2>/dev/null | grep -E "regs|spill" | head -8
export PYTHONPATH=/tmp/site
echo "== fused tests (tree) $((SECONDS - t0)) s"
timeout 120 python3 -m pytest -q tests/test_fused_forward.py 2>&1 | tail -3
echo "== sanitizers (tree, fused forward at both instances) $((SECONDS - t0)) s"
MLSTM_EXT_FUSED_FW=1 PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 60 compute-sanitizer --tool racecheck --error-exitcode 1 \
    python3 benchmarks/sanitize_case.py --cases forward_l64_bf16,forward_l64_d128_fp16,forward_bf16 2>&1 | tail -3
MLSTM_EXT_FUSED_FW=1 PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 60 compute-sanitizer --tool memcheck --error-exitcode 1 \
    python3 benchmarks/sanitize_case.py --cases forward_l64_bf16,forward_l64_d128_fp16,forward_bf16 2>&1 | tail -3
wait
M=.ab_main/mlstm_ext/_C.abi3.so; N=mlstm_ext/_C.abi3.so
echo "== fused against the two kernels, one process (tree) $((SECONDS - t0)) s"
left 420 && timeout 60 python3 benchmarks/ab_env.py MLSTM_EXT_FUSED_FW --old 0 --new 1 --op forward --rounds 2 \
    --out "$OUT/ab_fused_env.md" > "$OUT/ab_fused_env.log" 2>&1; grep "^|" "$OUT/ab_fused_env.md" | head -8
echo "== forward A/B main -> tree, default plan $((SECONDS - t0)) s"
left 470 && python3 benchmarks/bench_gpu.py --ab "$M,$N" --ab-op forward --rounds 2 > "$OUT/ab_fw.log" 2>&1
cp "$OUT/ab.md" "$OUT/ab_fw.md" 2>/dev/null; grep -A6 "^| (B" "$OUT/ab_fw.md"
echo "== fw+bw A/B main -> tree, default plan $((SECONDS - t0)) s"
left 490 && python3 benchmarks/bench_gpu.py --ab "$M,$N" --ab-op fwbw --rounds 2 > "$OUT/ab_fwbw.log" 2>&1
cp "$OUT/ab.md" "$OUT/ab_fwbw.md" 2>/dev/null; grep -A6 "^| (B" "$OUT/ab_fwbw.md"
echo "== forward A/B main -> tree, MLSTM_EXT_FUSED_FW=1 $((SECONDS - t0)) s"
left 530 && MLSTM_EXT_FUSED_FW=1 python3 benchmarks/bench_gpu.py --ab "$M,$N" --ab-op forward --rounds 2 > "$OUT/ab_fw1.log" 2>&1
cp "$OUT/ab.md" "$OUT/ab_fw1.md" 2>/dev/null; grep -A6 "^| (B" "$OUT/ab_fw1.md"
rm -f "$OUT"/ptxas* "$OUT"/build*.log "$OUT"/b_*.log "$OUT"/gc.log "$OUT"/nvidia-smi.txt
echo "== end $((SECONDS - t0)) s"
