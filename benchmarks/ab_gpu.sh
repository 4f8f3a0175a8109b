#!/usr/bin/env bash
# A/B two builds of the CUDA kernel in one device call: default knobs vs $VARIANT_FLAGS (nvcc -D...).
# Each build's library is kept aside and selected with MLSTM_EXT_LIBRARY for the smoke benchmark.
set -uo pipefail
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/ab_out}; mkdir -p "$OUT"
build() {  # $1 = name, $2 = extra nvcc flags
  rm -rf build mlstm_ext/_C*.so
  NVCC_APPEND_FLAGS="$2" MAX_JOBS=16 python3 setup.py build_ext --inplace > "$OUT/build_$1.log" 2>&1 || { tail -20 "$OUT/build_$1.log"; return 1; }
  cp mlstm_ext/_C*.so "/tmp/lib_$1.so"
}
build A "" && build B "${VARIANT_FLAGS:-}"
for v in A B; do
  echo "== variant $v"
  MLSTM_EXT_LIBRARY=/tmp/lib_$v.so python3 benchmarks/smoke_gpu.py 2>&1 | tee "$OUT/smoke_$v.log" | grep -v "^OK"
done
