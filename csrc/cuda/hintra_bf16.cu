// Instantiates the H-step kernel for __nv_bfloat16 inputs (one file per dtype so they compile in parallel).
#include "cuda/hintra_launch.cuh"

namespace mlstm::cuda {

void launch_hintra_bf16(const HintraParams& p, int bdv, int64_t num_bh, cudaStream_t stream) {
  if (bdv == 64) return launch_hintra<HintraTraits<__nv_bfloat16, 64>>(p, num_bh, stream);
  launch_hintra<HintraTraits<__nv_bfloat16, 128>>(p, num_bh, stream);
}

void launch_hintra_sm90_bf16(const HintraParams& p, int bdv, int64_t num_bh, cudaStream_t stream) {
  if (bdv == 64) return launch_hintra_sm90<Sm90Traits<__nv_bfloat16, 64>>(p, num_bh, stream);
  launch_hintra_sm90<Sm90Traits<__nv_bfloat16, 128>>(p, num_bh, stream);
}

int sm90_smem_bytes(int bdv, int DHQK, int L) { return sm90_smem(bdv, DHQK, L); }

}  // namespace mlstm::cuda
