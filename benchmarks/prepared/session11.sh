#!/usr/bin/env bash
# Device calls of the eleventh session: the tree is main + signed_nsum_bw_pipelines.patch + the
# fused forward (opt-in, MLSTM_EXT_FUSED_FW=1); .ab_main is main before them (git archive HEAD,
# carried). Each call builds what it needs; each stage runs only while the call has time for it.
#   PART=1: build tree and main; fused tests; fused forward A/B (env, one build); the patch's CUDA
#           tests; forward and fw+bw A/B main -> tree.
#   PART=2: build tree; tables against Triton with the fused forward on; the backward's modes; the
#           pipelines' A/B; racecheck and memcheck (backward cases, the fused forward).
#   PART=3: build tree; the CUDA tests; the fused forward's default plan against off; the
#           pipelines' A/B; ncu of the fused kernel (profile stage) and bench_backward; tables.
set -uo pipefail
cd "$(dirname "$0")/../.."
export OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; t0=$SECONDS
left() { [ $((SECONDS - t0)) -lt "$1" ]; }
PART=${PART:-1}
if [ "$PART" = 1 ]; then
  ( cd .ab_main && MAX_JOBS=6 MLSTM_EXT_CUDA=1 python3 setup.py build_ext --inplace > "$OUT/b_main.log" 2>&1; echo "main build rc=$? $((SECONDS - t0)) s" ) &
fi
MAX_JOBS=$([ "$PART" = 1 ] && echo 10 || echo 16) STAGES=build bash benchmarks/gpu_check.sh > "$OUT/gc.log" 2>&1; echo "tree build rc=$? $((SECONDS - t0)) s"
grep -iE "fused_fw|error" "$OUT/gc.log" | head -5
grep -iA2 "fused_fw" "$OUT/ptxas_resource_usage.txt" 2>/dev/null | grep -E "registers|spill" | head -8
export PYTHONPATH=/tmp/site
M=.ab_main/mlstm_ext/_C.abi3.so; N=mlstm_ext/_C.abi3.so
ab() {  # NAME OP OLD NEW
  echo "== A/B $1 $((SECONDS - t0)) s"
  python3 benchmarks/bench_gpu.py --ab "$3,$4" --ab-op $2 --rounds 2 > "$OUT/$1.log" 2>&1
  cp "$OUT/ab.md" "$OUT/$1.md"; grep -A6 "^| (B" "$OUT/$1.md"
}
if [ "$PART" = 1 ]; then
  echo "== fused tests $((SECONDS - t0)) s"
  timeout 150 python3 -m pytest -q tests/test_fused_forward.py 2>&1 | tail -15
  echo "== fused forward A/B (MLSTM_EXT_FUSED_FW 0 -> 1) $((SECONDS - t0)) s"
  left 420 && timeout 90 python3 benchmarks/ab_env.py MLSTM_EXT_FUSED_FW --old 0 --new 1 --op forward --rounds 3 \
      --out "$OUT/ab_fused_fw.md" > "$OUT/ab_fused.log" 2>&1; grep "^|" "$OUT/ab_fused_fw.md" | head -8; tail -3 "$OUT/ab_fused.log"
  echo "== patch tests $((SECONDS - t0)) s"
  left 420 && timeout 100 python3 -m pytest -q tests/test_backward.py tests/test_autograd.py -k "cuda or signed" 2>&1 | tail -2
  left 450 && timeout 60 python3 -m pytest -q tests/test_hostile.py tests/test_chunkwise.py -k cuda 2>&1 | tail -2
  wait
  left 480 && ab ab_fwbw fwbw "$M" "$N"
  left 530 && ab ab_forward forward "$M" "$N"
fi
if [ "$PART" = 2 ]; then
  echo "== tables against Triton, fused forward on $((SECONDS - t0)) s"
  MLSTM_EXT_FUSED_FW=1 timeout 150 python3 benchmarks/bench_gpu.py --quick --tables forward,fwbw --out "$OUT/bench.md" > "$OUT/bench.log" 2>&1
  grep -A6 "^| (B" "$OUT/bench.md" 2>/dev/null | head -30
  echo "== sanitizers $((SECONDS - t0)) s"
  left 420 && MLSTM_EXT_FUSED_FW=1 PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 60 compute-sanitizer --tool racecheck --error-exitcode 1 \
      python3 benchmarks/sanitize_case.py --cases forward_l64_bf16,backward_bf16,backward_fp16_l128 2>&1 | tail -5
  left 460 && MLSTM_EXT_FUSED_FW=1 PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 60 compute-sanitizer --tool memcheck --error-exitcode 1 \
      python3 benchmarks/sanitize_case.py --cases forward_l64_bf16,backward_bf16,backward_fp16_l128,forward_bf16 2>&1 | tail -5
  echo "== bench_backward $((SECONDS - t0)) s"
  left 500 && timeout 50 python3 benchmarks/bench_backward.py --profile 1 2>&1 | tail -24
  echo "== ab_env MLSTM_EXT_BW_PIPELINE=0 $((SECONDS - t0)) s"
  left 540 && timeout 50 python3 benchmarks/ab_env.py MLSTM_EXT_BW_PIPELINE --old 0 --rounds 2 --out "$OUT/ab_pipe0.md" > "$OUT/ab_pipe.log" 2>&1; grep "^|" "$OUT/ab_pipe0.md" | head -8
fi
if [ "$PART" = 3 ]; then  # the final tree: fused forward on by default where it measured faster
  echo "== CUDA tests $((SECONDS - t0)) s"
  timeout 240 python3 -m pytest -q tests/ -m cuda -p no:cacheprovider 2>&1 | tail -4
  echo "== fused forward, default plan against off $((SECONDS - t0)) s"
  left 330 && timeout 60 python3 benchmarks/ab_env.py MLSTM_EXT_FUSED_FW --old 0 --new unset --op forward --rounds 2 \
      --out "$OUT/ab_fused_default.md" > "$OUT/ab_fused.log" 2>&1; grep "^|" "$OUT/ab_fused_default.md" | head -8
  echo "== ab_env MLSTM_EXT_BW_PIPELINE=0 $((SECONDS - t0)) s"
  left 380 && timeout 60 python3 benchmarks/ab_env.py MLSTM_EXT_BW_PIPELINE --old 0 --rounds 2 --out "$OUT/ab_pipe0.md" > "$OUT/ab_pipe.log" 2>&1; grep "^|" "$OUT/ab_pipe0.md" | head -8
  echo "== ncu of the fused forward, bench_backward $((SECONDS - t0)) s"
  left 440 && MLSTM_EXT_FUSED_FW=1 PROFILE_CASES="fused_fw:forward:8,16,4096,128,128,64 fused_fw:forward:4,8,8192,256,512,64" \
      STAGES=profile timeout 150 bash benchmarks/gpu_check.sh > "$OUT/profile.log" 2>&1; grep -v "^$" "$OUT/ncu.txt" | head -60; tail -14 "$OUT/bench_backward.md"
  echo "== tables against Triton (default plan) $((SECONDS - t0)) s"
  left 470 && timeout 110 python3 benchmarks/bench_gpu.py --quick --tables forward,fwbw --out "$OUT/bench.md" > "$OUT/bench.log" 2>&1
  grep -A6 "^| (B" "$OUT/bench.md" 2>/dev/null | head -30
fi
rm -f "$OUT"/ptxas* "$OUT"/build*.log "$OUT"/b_*.log "$OUT"/nvidia-smi.txt "$OUT"/bench.png
echo "== end $((SECONDS - t0)) s"
