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

// Hopper kernel for 16-bit inputs (hintra_sm90.cuh), built only with sm_90a code in the library
// (MLSTM_EXT_SM90A). sm90_smem_bytes: its shared memory per block, to check before choosing it.
void launch_hintra_sm90_bf16(const HintraParams& p, int bdv, int64_t num_bh, cudaStream_t stream);
void launch_hintra_sm90_fp16(const HintraParams& p, int bdv, int64_t num_bh, cudaStream_t stream);
int sm90_smem_bytes(int bdv, int DHQK, int L);

}  // namespace mlstm::cuda
