// One position of the mLSTM recurrence, for generation (SPEC.md, "The inference step"): the
// states in, one token's q, k, v and gates, its output and the states out. The op is registered
// CompositeImplicitAutograd, so it runs on every device, differentiates through autograd and
// decomposes for torch.compile / torch.export like any ATen composite; on the CPU and on CUDA,
// where no input needs a gradient, it is one fused kernel (the op _recurrent_step_fused).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "common.h"

namespace mlstm {

// Sizes use SPEC.md's names. Gates and states are in the compute dtype (float32, or float64 for
// float64 inputs), gates as (B, NH); absent states are zeros.
struct StepArgs {
  at::Tensor vecQ, vecK, vecV;  // (B, NH, DHQK), (B, NH, DHQK), (B, NH, DHHV)
  at::Tensor scaI, scaF;        // (B, NH)
  at::Tensor matC, vecN, scaM;  // (B, NH, DHQK, DHHV), (B, NH, DHQK), (B, NH)
  bool m_keepdim = false;       // scaM came as (B, NH, 1): scaM_next has that shape too
  double qk_scale = 1.0, eps = 0.0;
  at::ScalarType compute = at::kFloat;
};

// absent_as_zeros: absent states become zero tensors (false: they stay undefined, for the fused
// kernel, which reads none).
StepArgs check_step_args(const at::Tensor& vecQ, const at::Tensor& vecK, const at::Tensor& vecV,
                         const at::Tensor& scaI, const at::Tensor& scaF,
                         const std::optional<at::Tensor>& matC, const std::optional<at::Tensor>& vecN,
                         const std::optional<at::Tensor>& scaM, std::optional<double> qk_scale, double eps,
                         bool absent_as_zeros = true);

// (vecH in vecQ's dtype, matC_next, vecN_next, scaM_next in the compute dtype).
using StepOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Contiguous outputs; scaM_next shaped like scaM ((B, NH, 1) or (B, NH)).
StepOutputs allocate_step_outputs(const StepArgs& a);

// The step in ATen ops (any device, differentiable through autograd).
StepOutputs step_aten(const StepArgs& a);
// The fused kernels (no autograd) fill the outputs allocate_step_outputs made: CPU
// (csrc/cpu/step_cpu.cpp) and CUDA (csrc/cuda/step_cuda.cpp).
void step_cpu(const StepArgs& a, StepOutputs& out);
#ifdef MLSTM_EXT_WITH_CUDA
void step_cuda(const StepArgs& a, StepOutputs& out);
#endif

// The op recurrent_step (CompositeImplicitAutograd): the fused kernel op _recurrent_step_fused
// where it applies (CPU or CUDA, no input needing a gradient), step_aten otherwise.
StepOutputs recurrent_step(const at::Tensor& vecQ, const at::Tensor& vecK, const at::Tensor& vecV,
                           const at::Tensor& scaI, const at::Tensor& scaF,
                           const std::optional<at::Tensor>& matC, const std::optional<at::Tensor>& vecN,
                           const std::optional<at::Tensor>& scaM, std::optional<double> qk_scale,
                           double eps);

}  // namespace mlstm
