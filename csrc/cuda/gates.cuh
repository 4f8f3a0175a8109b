// The gate arithmetic every kernel that reads forget gates shares: SPEC.md step 1, and the exact
// spans bg[t] - bg[s] of a float64 prefix sum kept as float + remainder.
#pragma once

#include <cuda_runtime.h>

#include "common.h"

namespace mlstm::cuda {

// logsigmoid(f), finite values below kMinLogForget counted as it (NaN and -inf pass as they are).
__device__ __forceinline__ float log_forget(float f) {
  constexpr float kMin = static_cast<float>(kMinLogForget);
  const float lf = fminf(f, 0.f) - log1pf(expf(-fabsf(f)));
  return (lf < kMin && !isinf(lf)) ? kMin : lf;
}

// A float64 prefix sum as float + remainder (0 where the float is not finite).
struct SplitSum {
  float hi, lo;
};
__device__ __forceinline__ SplitSum split_sum(double exact) {
  const float hi = static_cast<float>(exact);
  return {hi, isfinite(hi) ? static_cast<float>(exact - hi) : 0.f};
}

// max that keeps NaN (fmaxf drops it): a NaN gate must show in m like in every other output.
__device__ __forceinline__ float nan_max(float a, float b) {
  float r;
  asm("max.NaN.f32 %0, %1, %2;\n" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

// SPEC's den = max(|nsum|, e^-m) from the forward's vecN: den itself, or nsum where the forward
// ran with vecN_signed.
__device__ __forceinline__ float den_of(float vecN, float m, bool signed_n) {
  return signed_n ? nan_max(fabsf(vecN), expf(-m)) : vecN;
}

// bg[t] - bg[s] from the two parts (any scratch with arrays bg and bg_lo): the float parts
// subtract exactly where they are close, and where they are not the span is huge and its low bits
// do not matter. A later gate is never absorbed by a huge earlier one.
template <class G>
__device__ __forceinline__ float span(const G& g, int t, int s) {
  return (g.bg[t] - g.bg[s]) + (g.bg_lo[t] - g.bg_lo[s]);
}

}  // namespace mlstm::cuda
