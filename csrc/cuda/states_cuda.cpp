// CUDA backend entry of mlstm::recurrent_fw_states (placeholder until the kernel lands).
#include "states.h"

namespace mlstm {

void states_cuda(const StatesArgs&, at::Tensor&, at::Tensor&, at::Tensor&) {
  TORCH_CHECK(false, "recurrent_fw_states: the CUDA kernel is not built yet");
}

}  // namespace mlstm
