// Launch code shared by the per-dtype translation units (hintra_bf16.cu, ...): shared-memory
// size check and attribute, grid shape, launch on the caller's stream, error check.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include "cuda/hintra_kernel.cuh"
#include "cuda/hintra_sm90.cuh"
#include "cuda/hintra_launch.h"
#include "hintra.h"

namespace mlstm::cuda {

// One block per (batch*head, chunk, row tile, DHHV tile), on the caller's stream.
template <class Kernel>
void launch_grid(Kernel kernel, const HintraParams& p, int64_t num_bh, int threads, int smem,
                 cudaStream_t stream) {
  const int64_t blocks = num_bh * p.NC * p.n_qt * p.n_dvt;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "parallel_fw_hintra: ", num(blocks),
              " thread blocks exceed the CUDA grid limit; split the batch");
  if (blocks == 0) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  kernel<<<static_cast<unsigned>(blocks), threads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <class Tr>
void launch_hintra(const HintraParams& p, int64_t num_bh, cudaStream_t stream) {
  const SmemLayout lay = make_smem_layout<Tr>(p.DHQK, p.L);
  int dev = 0, max_smem = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  TORCH_CHECK(lay.bytes <= max_smem, "parallel_fw_hintra: DHQK = ", num(p.DHQK),
              " with chunk_size = ", num(p.L), " needs ", num(lay.bytes),
              " bytes of shared memory per block in the CUDA kernel, more than this GPU allows (",
              num(max_smem), "); use a smaller DHQK or chunk_size, or CPU tensors");
  launch_grid(hintra_kernel<Tr>, p, num_bh, 2 * p.rows_per_block, lay.bytes, stream);
}

template <class Tr>
void launch_hintra_sm90(const HintraParams& p, int64_t num_bh, cudaStream_t stream) {
  launch_grid(hintra_sm90_kernel<Tr>, p, num_bh, Tr::kThreads,
              make_sm90_layout<Tr>(p.DHQK, p.L).bytes, stream);
}

// Shared memory of the sm_90a kernel (the same for both 16-bit dtypes).
inline int sm90_smem(int bdv, int DHQK, int L) {
  return bdv == 64 ? make_sm90_layout<Sm90Traits<__nv_bfloat16, 64>>(DHQK, L).bytes
                   : make_sm90_layout<Sm90Traits<__nv_bfloat16, 128>>(DHQK, L).bytes;
}

}  // namespace mlstm::cuda
