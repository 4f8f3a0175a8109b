// Launch of the states kernel, shared by the per-dtype translation units (states_bf16.cu, ...):
// grid, shared-memory attribute, the caller's stream, error check.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include "common.h"
#include "cuda/states_kernel.cuh"

namespace mlstm::cuda {

template <class Tr>
void launch_states_with(const StatesParams& p, int64_t blocks, cudaStream_t stream) {
  constexpr int smem = Tr::kSmemBytes;
  auto kernel = states_kernel<Tr, false>;
  if constexpr (!Tr::kIsFloat) {
    if (p.c16) kernel = states_kernel<Tr, true>;
  }
  // Past 48 KB a block needs the opt-in (every sm_80+ GPU allows at least 99 KB).
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  }
  kernel<<<static_cast<unsigned>(blocks), Tr::kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// One or two warps per strip (p.split, from the plan in states_cuda.cpp).
template <typename T>
void launch_states(const StatesParams& p, int64_t num_bh, cudaStream_t stream) {
  const int64_t blocks = num_bh * p.n_qkt * p.n_hvt;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "recurrent_fw_states: ", num(blocks),
              " thread blocks exceed the CUDA grid limit; split the batch");
  if (blocks == 0) return;
  if (p.split) {
    launch_states_with<StatesTraits<T, 2>>(p, blocks, stream);
  } else {
    launch_states_with<StatesTraits<T, 1>>(p, blocks, stream);
  }
}

}  // namespace mlstm::cuda
