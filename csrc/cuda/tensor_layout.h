// Host-side layout helpers of the CUDA entry points (shared; new code includes this header).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace mlstm::cuda {

// The kernels read rows with unit column stride; other layouts get one deliberate contiguous copy.
inline at::Tensor unit_last_stride(const at::Tensor& t) {
  return (t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

// 16-byte copies are legal when the base and every step along dims 0..row_dim are 16-byte aligned.
inline bool rows_aligned16(const at::Tensor& t, int64_t row_dim) {
  const int64_t es = t.element_size();
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int64_t d = 0; d <= row_dim; ++d)
    if (t.size(d) > 1 && (t.stride(d) * es) % 16 != 0) return false;
  return true;
}

}  // namespace mlstm::cuda
