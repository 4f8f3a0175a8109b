// The whole chunkwise mLSTM forward (SPEC.md, "The whole forward"): the recurrent step for the
// chunk-border states, then the H step on them. Device-independent: it calls one backend's
// states and H-step kernels.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "hintra.h"
#include "states.h"

namespace mlstm {

struct ForwardArgs {
  StatesArgs states;  // K, V, gates, initial states, sizes
  at::Tensor matQ;    // (B, NH, S, DHQK)
  double qk_scale = 0.0;
  double eps = 0.0;
  // vecN holds nsum (signed, before |.| and the floor e^-m) instead of den = max(|nsum|, e^-m):
  // the backward then reads nsum's sign instead of recomputing nsum (SPEC.md, "The backward").
  bool vecN_signed = false;
};

// matH (B, NH, S, DHHV) in matQ's dtype; the last states C (B, NH, DHQK, DHHV), n (B, NH, DHQK),
// m (B, NH) and the H step's vecN, vecM (B, NH, S), all float32 (float64 for float64 inputs).
using ForwardOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

ForwardArgs check_forward_args(const at::Tensor& matQ, const at::Tensor& matK,
                               const at::Tensor& matV, const at::Tensor& vecI,
                               const at::Tensor& vecF, const std::optional<at::Tensor>& matC_initial,
                               const std::optional<at::Tensor>& vecN_initial,
                               const std::optional<at::Tensor>& scaM_initial,
                               std::optional<double> qk_scale, int64_t chunk_size, double eps,
                               c10::string_view grad_mode, bool vecN_signed);

// The H step's arguments on the states the recurrent step made (already valid by construction).
HintraArgs hintra_args_for_forward(const ForwardArgs& f, const at::Tensor& matC_all,
                                   const at::Tensor& vecN_all, const at::Tensor& scaM_all);

#ifdef MLSTM_EXT_WITH_CUDA
// The fused forward (csrc/cuda/fused_fw_cuda.cpp): fills `out` and returns true where it applies
// and the plan picks it (MLSTM_EXT_FUSED_FW: 0 never, 1 wherever it applies, default where it
// measured faster); else returns false and the op runs the two kernels.
bool fused_forward_cuda(const ForwardArgs& f, ForwardOutputs& out);
// Where the fused kernel did not run: the arguments with the chunk size the two kernels run at
// (fused_fw_cuda.cpp), or as given.
ForwardArgs planned_two_step_chunk(const ForwardArgs& f);
#endif

}  // namespace mlstm
