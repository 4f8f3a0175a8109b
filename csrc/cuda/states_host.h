// Host helpers of the kernels that walk the states (states_cuda.cpp, fused_fw_cuda.cpp): the
// states' gate kernel and the initial states' pointers, written once.
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include <utility>

#include "states.h"

namespace mlstm::cuda {

// Runs the states' gate kernel (states_gates.cu) on `stream`: returns a (B*NH, S) and the pairs
// (g_k, max_s a[s]) as (B*NH, NC, 2), float32. NC = 0 launches nothing.
std::pair<at::Tensor, at::Tensor> run_states_gates(const StatesArgs& a, cudaStream_t stream);

// The initial states' pointers and strides into any params struct with StatesParams' names
// (left null where a state is absent: the kernels start from zeros).
template <class P>
void set_initial_states(P& p, const StatesArgs& a) {
  if (a.matC_initial.defined()) {
    const at::Tensor& c = a.matC_initial;
    p.C0 = c.data_ptr<float>();
    p.C0_sb = c.stride(0), p.C0_sh = c.stride(1), p.C0_sr = c.stride(2), p.C0_sc = c.stride(3);
  }
  if (a.vecN_initial.defined()) {
    const at::Tensor& n = a.vecN_initial;
    p.n0 = n.data_ptr<float>();
    p.n0_sb = n.stride(0), p.n0_sh = n.stride(1), p.n0_sr = n.stride(2);
  }
  if (a.scaM_initial.defined()) {  // (B, NH)
    const at::Tensor& m = a.scaM_initial;
    p.m0 = m.data_ptr<float>();
    p.m0_sb = m.stride(0), p.m0_sh = m.stride(1);
  }
}

}  // namespace mlstm::cuda
