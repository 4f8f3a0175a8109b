#!/usr/bin/env bash
# How the mma.sync fused forward's chunk time splits between its two chains (prepared in the
# fifteenth session, not yet run; benchmarks/NOTES.md, "Fifteenth session"): the landed kernel
# against two probe builds of it (fused_fw_probe_chain.patch, timing only, wrong outputs):
#   skiph: chunk k's H rows left out (Q C_k, S, W V, normaliser, stores): what the state chain
#          (loads, C_k split, barriers, update) costs alone;
#   skipu: the state update's products left out (start_chunk stays, so m and the rows' terms are
#          right and every output finite): the H chain alone.
# At grids of one block per SM (128 blocks) full ~ skiph + skipu - common means the chains run one
# after the other, and max(skiph, skipu) is what a block that overlaps them (state warps one chunk
# ahead of H warps) could reach; at 256 blocks (two per SM at DHQK 128) the same shows what
# co-residency already overlaps. Forced fused kernel (MLSTM_EXT_FUSED_FW=1), one process per build.
#   device: bash benchmarks/prepared/probe_chain.sh > $OUT/probe.log 2>&1   (~5 minutes; carry [".whl"])
#   TABLES=1: then the forward and forward + backward tables against Triton (default plan, ~70 s).
set -uo pipefail
cd "$(dirname "$0")/../.."
export OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; t0=$SECONDS
for v in skiph skipu; do
  rm -rf .ab_$v && mkdir -p .ab_$v && tar -c --exclude='*.so' setup.py pyproject.toml README.md LICENSE csrc mlstm_ext | tar -x -C .ab_$v &&
      { git apply --directory=.ab_$v benchmarks/prepared/fused_fw_probe_chain.patch ||
        (cd .ab_$v && patch -s -p1 < ../benchmarks/prepared/fused_fw_probe_chain.patch); } || { echo "no probe tree $v"; exit 1; }
done
flag() { case $1 in skiph) echo -DMLSTM_EXT_PROBE_SKIP_H ;; skipu) echo -DMLSTM_EXT_PROBE_SKIP_UPDATE ;; esac; }
for v in skiph skipu; do
  ( cd .ab_$v && MAX_JOBS=5 MLSTM_EXT_CUDA=1 NVCC_APPEND_FLAGS="$(flag $v)" timeout 400 python3 setup.py build_ext --inplace \
      > "$OUT/build_$v.log" 2>&1; echo "build $v rc=$? $((SECONDS - t0)) s" ) &
done
MAX_JOBS=6 STAGES=build bash benchmarks/gpu_check.sh > "$OUT/gc.log" 2>&1; echo "build tree rc=$? $((SECONDS - t0)) s"
wait
export PYTHONPATH=/tmp/site
S="4,16,4096,128,128,64;8,16,4096,128,128,64;2,8,8192,256,512,64;4,8,8192,256,512,64"
for v in main skiph skipu; do
  d=.; [ $v = main ] || d=.ab_$v
  lib=$(find $d/mlstm_ext -maxdepth 1 -name '_C*.so' | head -n 1)
  [ -n "$lib" ] || { echo "$v: no library"; continue; }
  MLSTM_EXT_LIBRARY=$(realpath "$lib") MLSTM_EXT_FUSED_FW=1 timeout 90 python3 benchmarks/ab_env.py MLSTM_EXT_FUSED_FW \
      --old 1 --new 1 --op forward --rounds 2 --shapes "$S" --out "$OUT/t_$v.md" > /dev/null 2>&1
  echo "== $v ($lib) $((SECONDS - t0)) s"; grep -E "^\| \(" "$OUT/t_$v.md" | cut -d'|' -f2,6,7
done
if [ "${TABLES:-0}" = 1 ]; then
  echo "== tables against Triton (default plan) $((SECONDS - t0)) s"
  timeout 100 python3 benchmarks/bench_gpu.py --quick --tables forward,fwbw --out "$OUT/bench.md" > "$OUT/bench.log" 2>&1
  echo "bench rc=$?"; grep -A6 "^| (B" "$OUT/bench.md" 2>/dev/null | head -24
fi
rm -f "$OUT"/ptxas* "$OUT"/build*.log "$OUT"/nvidia-smi.txt "$OUT"/gc.log
echo "== end $((SECONDS - t0)) s"
