#!/usr/bin/env bash
# The first device call for signed_nsum_bw_pipelines.patch (benchmarks/NOTES.md, tenth session),
# ~8 minutes, in the order of what a cut-off call should still have measured. Trees, built side
# by side:
#   .ab_main  main as it is (made here from the working tree)
#   the tree  main + the patch, applied in place (undo: git checkout -- . ; the patch also adds
#             nothing outside csrc, mlstm_ext, tests, benchmarks, docs, README.md)
# then: the CUDA tests of the backward on the tree (signed normaliser both ways, the pipelines'
# same-bits test, hostile inputs), racecheck of the backward, fw+bw A/B main -> tree (two builds,
# interleaved, accuracy against float64), the forward and fw+bw tables against Triton, the
# backward op's modes in one process (den / nsum / normaliser constant: bench_backward.py), the
# pipelines in one process (ab_env.py MLSTM_EXT_BW_PIPELINE=0 against the default), the forward
# A/B (the H step's epilogue gained a select) and memcheck, in two calls (PART below: a call may
# take 600 s at most); each stage runs only while its call has time for it.
#
#   device: bash benchmarks/prepared/check.sh > $OUT/check.log 2>&1   (carry [".whl"])
#   PART=1 (default): the tests, racecheck, the fw+bw A/B and the tables (~8 minutes);
#   PART=2: bench_backward, the pipelines' A/B, the forward A/B and memcheck (~6 minutes);
#   PART=all: both in one call (more than the 600 s a call may take).
set -uo pipefail
cd "$(dirname "$0")/../.."
export OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; t0=$SECONDS
left() { [ $((SECONDS - t0)) -lt "$1" ]; }
PART=${PART:-1}
part() { [ "$PART" = all ] || [ "$PART" = "$1" ]; }
rm -rf .ab_main && mkdir -p .ab_main
tar --exclude=./.git --exclude='./.ab_*' --exclude=./build --exclude=./.whl --exclude='*.so' -cf - . | tar -xf - -C .ab_main
git apply benchmarks/prepared/signed_nsum_bw_pipelines.patch || { echo "the patch does not apply"; exit 1; }
( cd .ab_main && MAX_JOBS=6 MLSTM_EXT_CUDA=1 python3 setup.py build_ext --inplace > "$OUT/b_main.log" 2>&1; echo "main build rc=$? $((SECONDS - t0)) s" ) &
MAX_JOBS=10 STAGES=build bash benchmarks/gpu_check.sh > "$OUT/gc.log" 2>&1; echo "tree build rc=$? $((SECONDS - t0)) s"
grep -i "bw_p" "$OUT/ptxas_resource_usage.txt" 2>/dev/null | head -8
export PYTHONPATH=/tmp/site
if part 1; then
echo "== tests (tree) $((SECONDS - t0)) s"
timeout 100 python3 -m pytest -q tests/test_backward.py tests/test_autograd.py -k "cuda or signed" 2>&1 | tail -2
timeout 60 python3 -m pytest -q tests/test_hostile.py tests/test_chunkwise.py -k cuda 2>&1 | tail -2
echo "== racecheck (tree) $((SECONDS - t0)) s"
PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 60 compute-sanitizer --tool racecheck --error-exitcode 1 \
    python3 benchmarks/sanitize_case.py --cases backward_bf16,backward_fp16_l128 2>&1 | tail -2
fi
wait
M=.ab_main/mlstm_ext/_C.abi3.so; N=mlstm_ext/_C.abi3.so
ab() {  # NAME OP OLD NEW
  echo "== A/B $1 $((SECONDS - t0)) s"
  python3 benchmarks/bench_gpu.py --ab "$3,$4" --ab-op $2 --rounds 2 > "$OUT/$1.log" 2>&1
  cp "$OUT/ab.md" "$OUT/$1.md"; grep -A6 "^| (B" "$OUT/$1.md"
}
if part 1; then
left 330 && ab ab_fwbw fwbw "$M" "$N"
echo "== forward and fw+bw against Triton (tree) $((SECONDS - t0)) s"
left 400 && timeout 120 python3 benchmarks/bench_gpu.py --quick --tables forward,fwbw --out "$OUT/bench.md" > "$OUT/bench.log" 2>&1
grep -A6 "^| (B" "$OUT/bench.md" 2>/dev/null | head -30
fi
if part 2; then
echo "== bench_backward (tree) $((SECONDS - t0)) s"
left 500 && timeout 60 python3 benchmarks/bench_backward.py --profile 1 2>&1 | tail -24
echo "== ab_env MLSTM_EXT_BW_PIPELINE=0 (tree) $((SECONDS - t0)) s"
left 540 && timeout 60 python3 benchmarks/ab_env.py MLSTM_EXT_BW_PIPELINE --old 0 --rounds 2 --out "$OUT/ab_pipe0.md" > "$OUT/ab_pipe.log" 2>&1; grep "^|" "$OUT/ab_pipe0.md" | head -8
left 580 && ab ab_forward forward "$M" "$N"
echo "== memcheck (tree) $((SECONDS - t0)) s"
left 620 && PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 60 compute-sanitizer --tool memcheck --error-exitcode 1 \
    python3 benchmarks/sanitize_case.py --cases backward_bf16,backward_fp16_l128,forward_bf16 2>&1 | tail -2
fi
rm -f "$OUT"/ptxas* "$OUT"/build*.log "$OUT"/b_*.log "$OUT"/gc.log "$OUT"/nvidia-smi.txt "$OUT"/bench.png
echo "== end $((SECONDS - t0)) s"
