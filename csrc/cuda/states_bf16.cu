// Instantiates the states kernel for __nv_bfloat16 inputs (one file per dtype so they compile in parallel).
#include "cuda/states_launch.cuh"

namespace mlstm::cuda {
void launch_states_bf16(const StatesParams& p, int64_t num_bh, cudaStream_t stream) {
  launch_states<__nv_bfloat16>(p, num_bh, stream);
}
}  // namespace mlstm::cuda
