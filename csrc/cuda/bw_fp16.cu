// The fused backward kernels for float16 inputs (one file per dtype: they compile in parallel).
#include "cuda/bw_kernels.cuh"

namespace mlstm::cuda {
void launch_bw_fp16(const BwParams& p, bool post, cudaStream_t s) { bw::launch_bw_any<__half>(p, post, s); }
}  // namespace mlstm::cuda
