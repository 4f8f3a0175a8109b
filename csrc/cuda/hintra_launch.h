// Host-side entry points of the CUDA kernel, one per input dtype (hintra_{bf16,fp16,fp32}.cu).
#pragma once

#include <cuda_runtime.h>

#include "cuda/hintra_traits.cuh"

namespace mlstm::cuda {

// bdv is the DHHV tile (64 or 128; float32 inputs always use 64). Runs on `stream`.
void launch_hintra_bf16(const HintraParams& p, int bdv, int64_t num_bh, cudaStream_t stream);
void launch_hintra_fp16(const HintraParams& p, int bdv, int64_t num_bh, cudaStream_t stream);
void launch_hintra_fp32(const HintraParams& p, int bdv, int64_t num_bh, cudaStream_t stream);
int fp32_dv_tile();  // the DHHV tile the float32 kernel was built with

}  // namespace mlstm::cuda
