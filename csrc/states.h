// The recurrent step of the chunkwise mLSTM forward (SPEC.md, "How the states are made"): the
// memory states at every chunk border, NC+1 slots, slot 0 the initial state.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "common.h"

namespace mlstm {

// Sizes use SPEC.md's names. Gates are float32 (float64 when matK is float64, CPU only);
// initial states are in the compute dtype (float32, or float64 for float64 inputs) or undefined
// (zeros). matK/matV keep the caller's strides.
struct StatesArgs {
  at::Tensor matK, matV;     // (B, NH, S, DHQK), (B, NH, S, DHHV)
  at::Tensor vecI, vecF;     // (B, NH, S)
  at::Tensor matC_initial;   // (B, NH, DHQK, DHHV) or undefined
  at::Tensor vecN_initial;   // (B, NH, DHQK) or undefined
  at::Tensor scaM_initial;   // (B, NH) or undefined
  int64_t B = 0, NH = 0, S = 0, DHQK = 0, DHHV = 0, L = 0, NC = 0;
};

// Outputs, contiguous, float32 (float64 for float64 inputs):
//   matC_all (B, NH, (NC+1)*DHQK, DHHV), vecN_all (B, NH, (NC+1)*DHQK), scaM_all (B, NH, NC+1).
using StatesOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

StatesArgs check_states_args(const at::Tensor& matK, const at::Tensor& matV,
                             const at::Tensor& vecI, const at::Tensor& vecF,
                             const std::optional<at::Tensor>& matC_initial,
                             const std::optional<at::Tensor>& vecN_initial,
                             const std::optional<at::Tensor>& scaM_initial, int64_t chunk_size);

// C in c_dtype where given (the CUDA backward's recompute keeps it in the 16-bit input dtype),
// else, like n and m, in the compute dtype.
StatesOutputs allocate_states_outputs(const StatesArgs& a, std::optional<at::ScalarType> c_dtype = std::nullopt);

// Backends fill the outputs the op allocated (every slot, slot 0 included).
void states_cpu(const StatesArgs& a, at::Tensor& matC_all, at::Tensor& vecN_all, at::Tensor& scaM_all);
#ifdef MLSTM_EXT_WITH_CUDA
void states_cuda(const StatesArgs& a, at::Tensor& matC_all, at::Tensor& vecN_all, at::Tensor& scaM_all);
#endif

}  // namespace mlstm
