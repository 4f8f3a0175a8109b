// Per-device facts and process-wide switches the plan reads, each looked up once.
#pragma once

#include "cuda/hintra_params.h"

namespace mlstm::cuda {

// Compute capability and shared-memory limits of CUDA device `device`, read on first use.
const DeviceFacts& device_facts(int device);

// Whether plans may pick the sm_90a kernel: the library carries its code, and the switch is on
// (MLSTM_EXT_SM90=0 in the environment turns it off at start; set_sm90_enabled flips it at run
// time, for tests and A/B timing).
bool sm90_enabled();
bool set_sm90_enabled(bool on);  // returns the previous setting

}  // namespace mlstm::cuda
