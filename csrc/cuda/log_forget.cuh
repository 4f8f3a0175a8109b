// SPEC.md step 1 on the device, for every kernel that reads forget gates: logsigmoid(f), finite
// values below kMinLogForget counted as it (NaN and -inf pass as they are).
#pragma once

#include <cuda_runtime.h>

#include "common.h"

namespace mlstm::cuda {

__device__ __forceinline__ float log_forget(float f) {
  constexpr float kMin = static_cast<float>(kMinLogForget);
  const float lf = fminf(f, 0.f) - log1pf(expf(-fabsf(f)));
  return (lf < kMin && !isinf(lf)) ? kMin : lf;
}

}  // namespace mlstm::cuda
