#!/usr/bin/env bash
# One device call (~5 minutes) for two prepared patches of the fused forward (benchmarks/NOTES.md,
# twelfth session), applied in this order:
#   fused_fw_qn_mma.patch      q . n_k on the tensor cores (n_k as three exact bf16 terms in the
#                              pad of C_k's shared rows) instead of a scalar loop;
#   fused_fw_gate_terms.patch  the H rows' gate terms that do not depend on the state made for
#                              every chunk by a small kernel before the fused one
#                              (fused_fw_gates.cu), the rows' m-dependent terms made during the
#                              chunk before: no gate scan and one barrier instead of three per
#                              chunk; stage_gates split into the functions both use.
# Also the review mend b662d14 (the fused kernel calls the states kernel's start_chunk and
# state_kstep instead of a copy): .ab_pre is main with states_step_shared.patch reversed.
# Builds .ab_pre, main (.ab_main), main + the first patch (.ab_qn) and main + both (the tree, in
# place) side by side, then: the fused forward's tests and sanitizers on the tree (every instance), the
# forward A/Bs main -> qn -> tree (default plan; the two-kernel shapes show the stage_gates
# refactor in the H kernels), main -> tree with MLSTM_EXT_FUSED_FW=1, the fw+bw A/B main -> tree,
# the fused kernel against the two kernels in one process, and last the mend's A/B .ab_pre -> main
# (forward: the fused kernel at the first shape, the states kernel at the others; fw+bw: the
# backward's recompute).
#   device: bash benchmarks/prepared/check_fused_qn.sh > $OUT/check.log 2>&1   (carry [".whl"])
set -uo pipefail
cd "$(dirname "$0")/../.."
export OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; t0=$SECONDS
left() { [ $((SECONDS - t0)) -lt "$1" ]; }
for d in .ab_pre .ab_main .ab_qn; do
  rm -rf "$d" && mkdir -p "$d"
  tar --exclude=./.git --exclude='./.ab_*' --exclude=./build --exclude=./.whl --exclude='*.so' -cf - . | tar -xf - -C "$d"
done
git apply -R --directory=.ab_pre benchmarks/prepared/states_step_shared.patch || { echo "the mend does not reverse (.ab_pre)"; exit 1; }
git apply --directory=.ab_qn benchmarks/prepared/fused_fw_qn_mma.patch || { echo "the qn patch does not apply (.ab_qn)"; exit 1; }
git apply benchmarks/prepared/fused_fw_qn_mma.patch || { echo "the qn patch does not apply"; exit 1; }
git apply benchmarks/prepared/fused_fw_gate_terms.patch || { echo "the gate-terms patch does not apply"; exit 1; }
for d in .ab_pre .ab_main .ab_qn; do
  ( cd "$d" && MAX_JOBS=4 MLSTM_EXT_CUDA=1 python3 setup.py build_ext --inplace > "$OUT/b_$d.log" 2>&1; echo "$d build rc=$? $((SECONDS - t0)) s" ) &
done
MAX_JOBS=6 STAGES=build bash benchmarks/gpu_check.sh > "$OUT/gc.log" 2>&1; echo "tree build rc=$? $((SECONDS - t0)) s"
grep -A2 "fused_fw" "$OUT/ptxas_resource_usage.txt" 2>/dev/null | grep -E "regs|spill" | head -8
export PYTHONPATH=/tmp/site
echo "== fused tests (tree) $((SECONDS - t0)) s"
timeout 120 python3 -m pytest -q tests/test_fused_forward.py 2>&1 | tail -3
echo "== the H kernels' tests (stage_gates split into shared functions) $((SECONDS - t0)) s"
timeout 150 python3 -m pytest -q tests/test_hostile.py tests/test_chunkwise.py tests/test_cuda_op.py -m cuda -p no:cacheprovider 2>&1 | tail -3
echo "== sanitizers (tree, the fused forward's three instances) $((SECONDS - t0)) s"
MLSTM_EXT_FUSED_FW=1 PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 60 compute-sanitizer --tool racecheck --error-exitcode 1 \
    python3 benchmarks/sanitize_case.py --cases forward_l64_bf16,forward_l64_d128_fp16,forward_bf16 2>&1 | tail -3
MLSTM_EXT_FUSED_FW=1 PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 60 compute-sanitizer --tool memcheck --error-exitcode 1 \
    python3 benchmarks/sanitize_case.py --cases forward_l64_bf16,forward_l64_d128_fp16,forward_bf16 2>&1 | tail -3
wait
P=.ab_pre/mlstm_ext/_C.abi3.so; M=.ab_main/mlstm_ext/_C.abi3.so; Q=.ab_qn/mlstm_ext/_C.abi3.so; N=mlstm_ext/_C.abi3.so
ab() {  # NAME OP OLD NEW [env]
  echo "== A/B $1 $((SECONDS - t0)) s"
  env ${5:-} python3 benchmarks/bench_gpu.py --ab "$3,$4" --ab-op "$2" --rounds 2 > "$OUT/$1.log" 2>&1
  cp "$OUT/ab.md" "$OUT/$1.md" 2>/dev/null; grep -A6 "^| (B" "$OUT/$1.md"
}
echo "== fused against the two kernels, one process (tree) $((SECONDS - t0)) s"
left 400 && timeout 60 python3 benchmarks/ab_env.py MLSTM_EXT_FUSED_FW --old 0 --new 1 --op forward --rounds 2 \
    --out "$OUT/ab_fused_env.md" > "$OUT/ab_fused_env.log" 2>&1; grep "^|" "$OUT/ab_fused_env.md" | head -8
left 440 && ab ab_fw_main_qn forward "$M" "$Q"
left 470 && ab ab_fw_qn_tree forward "$Q" "$N"
left 500 && ab ab_fwbw_main_tree fwbw "$M" "$N"
left 510 && ab ab_fw1_main_tree forward "$M" "$N" MLSTM_EXT_FUSED_FW=1
left 530 && ab ab_fw_pre_main forward "$P" "$M"
left 550 && ab ab_fwbw_pre_main fwbw "$P" "$M"
rm -f "$OUT"/ptxas* "$OUT"/build*.log "$OUT"/b_*.log "$OUT"/gc.log "$OUT"/nvidia-smi.txt "$OUT"/ab.md "$OUT"/ab.json
echo "== end $((SECONDS - t0)) s"
