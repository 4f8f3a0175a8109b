// Instantiates the fused forward kernel for __nv_bfloat16 inputs (one file per dtype so they compile in parallel).
#include "cuda/fused_fw_launch.cuh"

namespace mlstm::cuda {
void launch_fused_fw_bf16(const FusedFwParams& p, int dqk_cap, int L, int64_t blocks, cudaStream_t stream) {
  launch_fused_fw<__nv_bfloat16>(p, dqk_cap, L, blocks, stream);
}
}  // namespace mlstm::cuda
