#!/usr/bin/env bash
# One device call for the prepared patches of this folder (NOTES.md, seventh session): applies
# them to the working tree (which must be clean main), builds main into .ab_base and the patched
# tree in place, then: the CUDA backward tests, compute-sanitizer on the backward cases, forward +
# backward A/B of the two builds (with accuracy against float64), the forward A/B (the states
# kernel changed), the in-process A/B of the stored Qs, and the fw+bw table against Triton.
#
#     PATCHES="qs_in_gram_scan c16_backward_states" bash benchmarks/prepared/check.sh
#
# Run through the device tool with carry [".whl"]; outputs in $OUT. Undo with `git checkout -- .`.
set -uo pipefail
cd "$(dirname "$0")/../.."
export OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
PATCHES=${PATCHES:-"qs_in_gram_scan c16_backward_states"}
t0=$SECONDS
rm -rf .ab_base && mkdir -p .ab_base && git archive HEAD | tar -x -C .ab_base
for p in $PATCHES; do git apply "benchmarks/prepared/$p.patch" || { echo "patch $p does not apply"; exit 1; }; done
echo "applied: $PATCHES"
STAGES="build" bash benchmarks/gpu_check.sh > "$OUT/gc.log" 2>&1; grep -E "rc=|CUDA kernels" "$OUT/gc.log" | tail -2
export PYTHONPATH=/tmp/site
echo "== tests $((SECONDS - t0)) s"
python3 -m pytest -q tests/test_backward.py -k cuda 2>&1 | tail -2
python3 -m pytest -q tests/test_autograd.py tests/test_states_cuda.py tests/test_chunkwise.py -k "cuda or peak" 2>&1 | tail -2
echo "== memcheck $((SECONDS - t0)) s"
PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 120 compute-sanitizer --tool memcheck --error-exitcode 1 \
    python3 benchmarks/sanitize_case.py --cases backward_bf16,backward_fp16_l128,states_bf16,forward_bf16 2>&1 | tail -6
echo "== fw+bw A/B $((SECONDS - t0)) s"
STAGES="ab" AB_ARGS="--ab-op fwbw --rounds 2" bash benchmarks/gpu_check.sh > "$OUT/ab_gc.log" 2>&1
grep -A6 "^| (B" "$OUT/ab.md"
cp "$OUT/ab.md" "$OUT/ab_fwbw.md"
echo "== forward A/B $((SECONDS - t0)) s"
python3 benchmarks/bench_gpu.py --ab ".ab_base/mlstm_ext/_C.abi3.so,mlstm_ext/_C.abi3.so" --ab-op forward --rounds 2 \
    --out "$OUT/ab_forward.md" > "$OUT/ab_forward.log" 2>&1
grep -A6 "^| (B" "$OUT/ab_forward.md"
echo "== stored Qs in one process $((SECONDS - t0)) s"
python3 benchmarks/ab_env.py MLSTM_EXT_GRAM_SCAN --old qs --out "$OUT/ab_env.md" 2>&1 | tail -5
echo "== fw+bw against Triton $((SECONDS - t0)) s"
python3 benchmarks/bench_gpu.py --quick --tables fwbw --out "$OUT/bench.md" > "$OUT/bench.log" 2>&1
grep -A6 "^| (B" "$OUT/bench.md" | head -16
rm -f "$OUT"/ptxas* "$OUT"/build*.log
echo "== end $((SECONDS - t0)) s"
