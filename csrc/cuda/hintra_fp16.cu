// Instantiates the H-step kernel for __half inputs (one file per dtype so they compile in parallel).
#include "cuda/hintra_launch.cuh"

namespace mlstm::cuda {

void launch_hintra_fp16(const HintraParams& p, int bdv, int64_t num_bh, cudaStream_t stream) {
  if (bdv == 64) return launch_hintra<HintraTraits<__half, 64>>(p, num_bh, stream);
  launch_hintra<HintraTraits<__half, 128>>(p, num_bh, stream);
}

void launch_hintra_sm90_fp16(const HintraParams& p, int bdv, int64_t num_bh, cudaStream_t stream) {
  if (bdv == 64) return launch_hintra_sm90<Sm90Traits<__half, 64>>(p, num_bh, stream);
  launch_hintra_sm90<Sm90Traits<__half, 128>>(p, num_bh, stream);
}

}  // namespace mlstm::cuda
