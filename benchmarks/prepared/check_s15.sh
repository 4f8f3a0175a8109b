#!/usr/bin/env bash
# One device call (ran in the fifteenth session, H100, 335 s; benchmarks/NOTES.md) for the
# warpgroup-MMA fused forward (fused_fw_sm90_proto.patch, applied here unless the tree has it:
# fused_fw_sm90.cuh, MLSTM_EXT_FUSED_SM90=2..5) and the refactor that shares its pieces with the
# mma.sync kernel (fused_fw_common.cuh): build; side by side, the tests the change touches (the
# prototype's, the rest of the fused forward's; chunkwise, hostile, autograd, backward, xlstm with
# MLSTM_EXT_FUSED_SM90=4 in the default plan) and
# racecheck / memcheck of =2 and =4; then, alone on the GPU, the mma.sync fused kernel against each
# variant (forced: MLSTM_EXT_FUSED_FW=1), and the forward table against Triton with the fastest
# variant in the default plan.
#   device: BUDGET=570 bash benchmarks/prepared/check_s15.sh > $OUT/s15.log 2>&1   (carry [".whl", ".ab_base"])
#   BUDGET: the seconds the call may take; under 500 the tests get 150 s, under 450 only the fused forward's run.
set -uo pipefail
cd "$(dirname "$0")/../.."
export OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; t0=$SECONDS
left() { [ $((SECONDS - t0)) -lt "$1" ]; }
[ -f csrc/cuda/fused_fw_sm90.cuh ] || git apply benchmarks/prepared/fused_fw_sm90_proto.patch || { echo "the patch does not apply"; exit 1; }
MAX_JOBS=16 STAGES=build bash benchmarks/gpu_check.sh > "$OUT/gc.log" 2>&1; echo "build rc=$? $((SECONDS - t0)) s"
grep -B1 -A2 "fused_fw_sm90_kernel" "$OUT/ptxas_resource_usage.txt" 2>/dev/null | grep -E "Compiling|registers|spill" | head -12
export PYTHONPATH=/tmp/site
# The landed tree (HEAD), for a same-run A/B of the refactored mma.sync kernel; built meanwhile.
# (carried, or made here: mkdir -p .ab_base && git archive HEAD | tar -x -C .ab_base)
[ -f .ab_base/setup.py ] || { mkdir -p .ab_base && git archive HEAD | tar -x -C .ab_base; }
( cd .ab_base && MAX_JOBS=6 MLSTM_EXT_CUDA=1 timeout 300 python3 setup.py build_ext --inplace > "$OUT/build_base.log" 2>&1
  echo "base build rc=$? $((SECONDS - t0)) s" ) > "$OUT/base.txt" 2>&1 &
base_pid=$!
echo "== tests (4 processes) and sanitizers, side by side $((SECONDS - t0)) s"
B=${BUDGET:-570}
T=$(( B >= 500 ? 230 : 150 ))
pt() { local n=$1; shift; ( timeout $T python3 -m pytest -q -p no:cacheprovider -rfE "$@" > "$OUT/pytest_$n.log" 2>&1
       echo "tests $n rc=$? $((SECONDS - t0)) s: $(tail -1 "$OUT/pytest_$n.log")" ) & pids+=($!); }
pids=()
pt sm90 tests/test_fused_forward.py -k sm90
pt fused tests/test_fused_forward.py -k "not sm90"
if [ "$B" -ge 450 ]; then
  # the default plan with the wgmma build that keeps most of the work on wgmma (=4)
  MLSTM_EXT_FUSED_SM90=4 pt chunk tests/test_chunkwise.py tests/test_hostile.py -m cuda
  MLSTM_EXT_FUSED_SM90=4 pt grad tests/test_autograd.py tests/test_backward.py tests/test_xlstm_backend.py -m cuda
fi
for v in 2 4; do
  (
    for tool in racecheck memcheck; do
      r=$(MLSTM_EXT_FUSED_FW=1 MLSTM_EXT_FUSED_SM90=$v PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout $(( T / 3 )) compute-sanitizer \
          --tool $tool --error-exitcode 1 python3 benchmarks/sanitize_case.py --cases forward_l64_d72_bf16,forward_l64_bf16 2>&1 | tail -2 | tr '\n' ' ')
      echo "sanitize =$v $tool rc=$?: $r"
    done
  ) > "$OUT/sanitize_$v.log" 2>&1 &
  pids+=($!)
done
wait "${pids[@]}"
cat "$OUT"/sanitize_*.log; rm -f "$OUT"/sanitize_*.log
grep -hE "^(FAILED|ERROR)" "$OUT"/pytest_*.log | head -20
cat "$OUT"/pytest_*.log > "$OUT/pytest.log"; rm -f "$OUT"/pytest_*.log
echo "== mma.sync (MLSTM_EXT_FUSED_SM90=0) against the wgmma builds, forced, one process per variant $((SECONDS - t0)) s"
S="8,16,4096,128,128,64;4,16,4096,128,128,64;8,16,4096,64,64,64;4,8,8192,256,512,64"
best=""; bestr=9
ab() {  # ab VARIANT: forced fused, mma.sync (0) against VARIANT; keeps the lowest mean new/old
  MLSTM_EXT_FUSED_FW=1 timeout 55 python3 benchmarks/ab_env.py MLSTM_EXT_FUSED_SM90 --old 0 --new $1 --op forward \
      --rounds 2 --shapes "$S" --out "$OUT/ab_$1.md" > /dev/null 2>&1
  grep "^|" "$OUT/ab_$1.md" 2>/dev/null | head -7
  local r
  r=$(grep -E "^\| \(" "$OUT/ab_$1.md" 2>/dev/null | awk -F'|' '{s += $8; n++} END {if (n) printf "%.4f", s / n; else print 9}')
  echo "variant $1: mean new/old $r"
  if awk "BEGIN {exit !($r < $bestr)}"; then best=$1; bestr=$r; fi
}
for v in 2 4; do left $((B - 130)) && ab $v; done
echo "== the landed mma.sync kernel (HEAD) against the refactored one, default plan $((SECONDS - t0)) s"
wait $base_pid; cat "$OUT/base.txt"
old=$(find .ab_base/mlstm_ext -maxdepth 1 -name '_C*.so' | head -n 1); new=$(find mlstm_ext -maxdepth 1 -name '_C*.so' | head -n 1)
if [ -n "$old" ] && left $((B - 150)); then
  timeout 70 python3 benchmarks/bench_gpu.py --ab "$old,$new" --ab-op forward --rounds 2 --out "$OUT/ab.md" \
      > "$OUT/ab_refactor.log" 2>&1; echo "ab rc=$?"; grep "^|" "$OUT/ab.md" | head -8
fi
echo "== forward table against Triton, default plan with MLSTM_EXT_FUSED_SM90=${best:-none} $((SECONDS - t0)) s"
if [ -n "$best" ] && left $((B - 80)); then
  MLSTM_EXT_FUSED_SM90=$best timeout 65 python3 benchmarks/bench_gpu.py --quick --tables forward --out "$OUT/bench.md" \
      > "$OUT/bench.log" 2>&1; echo "bench rc=$?"
  grep -A7 "^| (B" "$OUT/bench.md" 2>/dev/null | head -12
fi
for v in 3 5; do left $((B - 55)) && ab $v; done
grep -q "rc=0" "$OUT/base.txt" && rm -f "$OUT/build_base.log"
rm -f "$OUT"/ab.json "$OUT"/base.txt "$OUT"/ab_refactor.log "$OUT"/ptxas* "$OUT"/build.log "$OUT"/build_ab*.log "$OUT"/nvidia-smi.txt "$OUT"/bench.png "$OUT"/bench.json "$OUT"/gc.log
echo "== end $((SECONDS - t0)) s"
