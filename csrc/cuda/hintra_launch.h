// The one launch of the H step, declared for the host entry (hintra_cuda.cpp): defined in
// hintra_launch_template.cuh, instantiated once per input dtype in hintra_{bf16,fp16,fp32}.cu.
#pragma once

#include <cuda_runtime.h>

#include "cuda/hintra_params.h"

namespace mlstm::cuda {

// Runs the kernel `plan` names for input type T on `stream`. T: float, __nv_bfloat16, __half.
template <typename T>
void launch_hintra(const HintraParams& p, const HintraPlan& plan, cudaStream_t stream);

}  // namespace mlstm::cuda
