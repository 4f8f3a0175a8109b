// Instantiates the H-step kernel for float inputs (one file per dtype so they compile in parallel).
#include "cuda/hintra_launch.cuh"

namespace mlstm::cuda {

int fp32_dv_tile() { return MLSTM_EXT_FP32_BDV; }

void launch_hintra_fp32(const HintraParams& p, int bdv, int64_t num_bh, cudaStream_t stream) {
  TORCH_CHECK(bdv == MLSTM_EXT_FP32_BDV, "parallel_fw_hintra: internal: float32 DHHV tile ", num(bdv));
  launch_hintra<HintraTraits<float, MLSTM_EXT_FP32_BDV>>(p, num_bh, stream);
}

}  // namespace mlstm::cuda
