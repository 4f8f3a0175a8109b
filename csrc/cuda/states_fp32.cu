// Instantiates the states kernel for float inputs (one file per dtype so they compile in parallel).
#include "cuda/states_launch.cuh"

namespace mlstm::cuda {
void launch_states_fp32(const StatesParams& p, int64_t num_bh, cudaStream_t stream) {
  launch_states<float>(p, num_bh, stream);
}
}  // namespace mlstm::cuda
