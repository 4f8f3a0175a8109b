// Definition of launch_hintra<T> (hintra_launch.h): the plan picks the kernel and its DHHV tile,
// this maps them onto the compiled kernel templates and launches on the caller's stream.
// Only what the plan can pick is instantiated: the sm_80 kernel with DHHV tiles 64 and 128 for
// 16-bit inputs and MLSTM_EXT_FP32_BDV for float32, the sm_90a kernel for 16-bit inputs (DHHV
// tiles 64 and 128, and its wide-head layout with tile 128).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include "common.h"
#include "cuda/hintra_launch.h"
#include "cuda/hintra_sm80.cuh"
#include "cuda/hintra_sm90.cuh"

namespace mlstm::cuda {

template <class Kernel>
void launch_kernel(Kernel kernel, const HintraParams& p, const HintraPlan& plan, cudaStream_t stream) {
  if (plan.blocks == 0) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, plan.smem_bytes));
  kernel<<<static_cast<unsigned>(plan.blocks), plan.threads, plan.smem_bytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_hintra(const HintraParams& p, const HintraPlan& plan, cudaStream_t stream) {
  if constexpr (std::is_same_v<T, float>) {
    TORCH_CHECK(plan.kernel == HintraKernel::kSm80 && plan.bdv == MLSTM_EXT_FP32_BDV,
                "parallel_fw_hintra: internal: no float32 kernel for this plan");
    launch_kernel(hintra_sm80_kernel<HintraTraits<float, MLSTM_EXT_FP32_BDV>>, p, plan, stream);
  } else {
    TORCH_CHECK(plan.bdv == 64 || plan.bdv == 128, "parallel_fw_hintra: internal: DHHV tile ",
                num(plan.bdv));
    if (plan.kernel == HintraKernel::kSm90) {
      if (plan.bdv == 64) return launch_kernel(hintra_sm90_kernel<Sm90Traits<T, 64>>, p, plan, stream);
      if (plan.sm90_wide) return launch_kernel(hintra_sm90_kernel<Sm90Traits<T, 128, true>>, p, plan, stream);
      return launch_kernel(hintra_sm90_kernel<Sm90Traits<T, 128>>, p, plan, stream);
    }
    if (plan.bdv == 64) return launch_kernel(hintra_sm80_kernel<HintraTraits<T, 64>>, p, plan, stream);
    launch_kernel(hintra_sm80_kernel<HintraTraits<T, 128>>, p, plan, stream);
  }
}

}  // namespace mlstm::cuda
