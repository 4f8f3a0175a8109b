// Instantiates the fused forward kernel for __half inputs (one file per dtype so they compile in parallel).
#include "cuda/fused_fw_launch.cuh"

namespace mlstm::cuda {
void launch_fused_fw_fp16(const FusedFwParams& p, int dqk_cap, int L, int64_t blocks, cudaStream_t stream) {
  launch_fused_fw<__half>(p, dqk_cap, L, blocks, stream);
}
}  // namespace mlstm::cuda
