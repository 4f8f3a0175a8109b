// The H-step launch for bfloat16 inputs (one file per dtype: they compile in parallel).
#include "cuda/hintra_launch_template.cuh"

namespace mlstm::cuda {
template void launch_hintra<__nv_bfloat16>(const HintraParams&, const HintraPlan&, cudaStream_t);
}
