#!/usr/bin/env bash
# The first device call for the prepared patches of this folder (benchmarks/NOTES.md, eighth
# session), ~5 minutes. Trees, built side by side:
#   .ab_base  06953f3 (the forward before the 16-bit recompute: made here, carried)
#   .ab_main  main as it is             .ab_xn  main + bw_pre_xn.patch
#   the tree  main + bw_pre_xn.patch + bw_post_l128.patch (applied in place; undo: git checkout -- csrc)
# then the CUDA backward tests on the tree, the A/Bs (forward .ab_base -> .ab_main: does the kC16
# kernel give the forward back?; fw+bw .ab_main -> .ab_xn -> tree), sanitizers, and the forward
# and fw+bw tables against Triton for the tree. (bw_pipeline.patch applies to main + bw_pre_xn,
# not beside bw_post_l128: rebase it before measuring it again.)
#
#   mkdir -p .ab_base && git archive 06953f3 | tar -x -C .ab_base    # here, before the call
#   pip download -q --no-deps mlstm-kernels==2.0.6 xlstm==2.0.6 einops==0.8.2 -d .whl
#   device: bash benchmarks/prepared/check.sh > $OUT/check.log 2>&1 (carry [".whl", ".ab_base"])
set -uo pipefail
cd "$(dirname "$0")/../.."
export OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; t0=$SECONDS
left() { [ $((SECONDS - t0)) -lt "$1" ]; }
copy_tree() {  # DEST: the working tree as it is, without build outputs or other trees
  rm -rf "$1" && mkdir -p "$1"
  tar --exclude=./.git --exclude='./.ab_*' --exclude=./build --exclude=./.whl --exclude='*.so' \
      -cf - . | tar -xf - -C "$1"
}
copy_tree .ab_main
# (--directory: a git apply run inside .ab_xn would patch the enclosing repository's paths or none)
copy_tree .ab_xn && git apply --directory=.ab_xn benchmarks/prepared/bw_pre_xn.patch || { echo "bw_pre_xn.patch does not apply"; exit 1; }
git apply benchmarks/prepared/bw_pre_xn.patch && git apply benchmarks/prepared/bw_post_l128.patch || { echo "patches do not apply"; exit 1; }
for t in .ab_base .ab_main .ab_xn; do
  ( cd $t && MAX_JOBS=4 MLSTM_EXT_CUDA=1 python3 setup.py build_ext --inplace > "$OUT/b_${t#.}.log" 2>&1; echo "$t build rc=$?" ) &
done
MAX_JOBS=4 STAGES=build bash benchmarks/gpu_check.sh > "$OUT/gc.log" 2>&1; echo "tree build rc=$?"
wait
export PYTHONPATH=/tmp/site
B=.ab_base/mlstm_ext/_C.abi3.so; M=.ab_main/mlstm_ext/_C.abi3.so; X=.ab_xn/mlstm_ext/_C.abi3.so; N=mlstm_ext/_C.abi3.so
ab() {  # NAME OP OLD NEW
  echo "== A/B $1 $((SECONDS - t0)) s"
  python3 benchmarks/bench_gpu.py --ab "$3,$4" --ab-op $2 --rounds 2 > "$OUT/$1.log" 2>&1
  cp "$OUT/ab.md" "$OUT/$1.md"; grep -A6 "^| (B" "$OUT/$1.md"
}
echo "== tests (tree) $((SECONDS - t0)) s"
timeout 90 python3 -m pytest -q tests/test_backward.py tests/test_autograd.py tests/test_states_cuda.py -k "cuda or peak" 2>&1 | tail -2
timeout 60 python3 -m pytest -q tests/test_hostile.py tests/test_chunkwise.py -k cuda 2>&1 | tail -2
ab ab_forward_base_vs_main forward "$B" "$M"
ab ab_fwbw_main_vs_xn fwbw "$M" "$X"
ab ab_fwbw_xn_vs_tree fwbw "$X" "$N"
echo "== sanitizers (tree) $((SECONDS - t0)) s"
left 330 && PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 60 compute-sanitizer --tool racecheck --error-exitcode 1 \
    python3 benchmarks/sanitize_case.py --cases backward_fp16_l128,backward_bf16 2>&1 | tail -2
left 400 && PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 60 compute-sanitizer --tool memcheck --error-exitcode 1 \
    python3 benchmarks/sanitize_case.py --cases backward_bf16,backward_fp16_l128,states_bf16,forward_bf16 2>&1 | tail -2
echo "== forward and fw+bw against Triton (tree) $((SECONDS - t0)) s"
left 470 && timeout 110 python3 benchmarks/bench_gpu.py --quick --tables forward,fwbw --out "$OUT/bench.md" > "$OUT/bench.log" 2>&1
grep -A6 "^| (B" "$OUT/bench.md" 2>/dev/null | head -30
rm -f "$OUT"/ptxas* "$OUT"/build*.log "$OUT"/b_*.log
echo "== end $((SECONDS - t0)) s"
