#!/usr/bin/env bash
# The chunk plans' device check (~4 minutes with the build; carry [".whl"] for the Triton table).
# The CUDA tests the chunk plans touch (test_backward, test_fused_forward's default-plan tests,
# test_chunkwise, test_hostile; side by side), benchmarks/chunk_choice.py (each pass at chunk 64
# and 128, and the plans) and, with TABLES=1, forward + backward against Triton. (Its PATCH=1, the
# two kernels at chunk 128, landed in e11ab77.)
#   device: bash benchmarks/prepared/check_s16.sh > $OUT/s16.log 2>&1
set -uo pipefail
cd "$(dirname "$0")/../.."
export OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; t0=$SECONDS
MAX_JOBS=16 STAGES=build bash benchmarks/gpu_check.sh > "$OUT/gc.log" 2>&1; echo "build rc=$? $((SECONDS - t0)) s"
export PYTHONPATH=/tmp/site
pt() { timeout 120 python3 -m pytest -q -p no:cacheprovider -rxX "$@" 2>&1; }
pt tests/test_backward.py -m cuda > "$OUT/t_bw.log" &
pt tests/test_fused_forward.py -k "default or two_kernels" > "$OUT/t_fw.log" &
pt tests/test_chunkwise.py tests/test_hostile.py -m cuda > "$OUT/t_ch.log" &
wait
for f in t_bw t_fw t_ch; do echo "== $f"; grep -E "passed|failed|^E |XPASS" "$OUT/$f.log" | tail -6; done
echo "tests done $((SECONDS - t0)) s"
timeout 60 python3 benchmarks/chunk_choice.py --shapes "${CHUNK_SHAPES:-1,8,16384,256,512;1,16,8192,128,128;4,8,8192,256,512}" \
    > "$OUT/chunk.md" 2>&1; echo "chunk_choice rc=$? $((SECONDS - t0)) s"; tail -12 "$OUT/chunk.md"
if [ "${TABLES:-0}" = 1 ]; then
  timeout 200 python3 benchmarks/bench_gpu.py --quick --tables "${TABLE_LIST:-fwbw}" --out "$OUT/bench.md" > "$OUT/bench.log" 2>&1
  echo "bench rc=$? $((SECONDS - t0)) s"; grep -A6 "^| (B" "$OUT/bench.md" 2>/dev/null | head -16
fi
rm -f "$OUT"/ptxas* "$OUT"/nvidia-smi.txt "$OUT"/gc.log "$OUT"/build.log
echo "== end $((SECONDS - t0)) s"
