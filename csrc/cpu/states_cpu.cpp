// CPU kernel of mlstm::recurrent_fw_states (placeholder until the compiled kernel lands).
#include "states.h"

namespace mlstm {

void states_cpu(const StatesArgs&, at::Tensor&, at::Tensor&, at::Tensor&) {
  TORCH_CHECK(false, "recurrent_fw_states: the CPU kernel is not built yet");
}

}  // namespace mlstm
