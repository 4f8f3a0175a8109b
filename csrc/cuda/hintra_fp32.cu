// The H-step launch for float32 inputs (one file per dtype: they compile in parallel).
#include "cuda/hintra_launch_template.cuh"

namespace mlstm::cuda {
template void launch_hintra<float>(const HintraParams&, const HintraPlan&, cudaStream_t);
}
