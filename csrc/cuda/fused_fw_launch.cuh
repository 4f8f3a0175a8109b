// Launch of the fused forward kernel, shared by its per-dtype translation units
// (fused_fw_bf16.cu, fused_fw_fp16.cu): the instance for (DHQK capacity, chunk size), the
// shared-memory attribute, the caller's stream.
#pragma once

#include <c10/cuda/CUDAException.h>

#include "cuda/fused_fw_kernel.cuh"

namespace mlstm::cuda {

template <typename T>
void launch_fused_fw(const FusedFwParams& p, int dqk_cap, int L, int64_t blocks, cudaStream_t stream) {
  auto go = [&](auto traits) {
    using Tr = decltype(traits);
    auto kernel = fused_fw_kernel<Tr>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmemBytes));
    kernel<<<static_cast<unsigned>(blocks), Tr::kThreads, Tr::kSmemBytes, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (L == 128) {
    go(FusedFwTraits<T, 128, 128>{});
  } else if (dqk_cap <= 128) {
    go(FusedFwTraits<T, 128, 64>{});
  } else {
    go(FusedFwTraits<T, 256, 64>{});
  }
}

}  // namespace mlstm::cuda
