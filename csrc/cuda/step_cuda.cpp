// CUDA backend entry of the generation step's fused kernel (step_params.h): device guard, the
// caller's stream, one launch into the outputs the op allocated.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/step_params.h"
#include "cuda/tensor_layout.h"
#include "step.h"

namespace mlstm {

void step_cuda(const StepArgs& a, StepOutputs& out) {
  check_not_float64_on_cuda("recurrent_step", "vecQ", a.vecQ);
  const c10::cuda::CUDAGuard guard(a.vecQ.device());
  auto& [vecH, matC_next, vecN_next, scaM_next] = out;
  const int64_t B = a.vecQ.size(0), NH = a.vecQ.size(1), DHQK = a.vecQ.size(2), DHHV = a.vecV.size(2);

  cuda::StepParams p{};
  p.q = a.vecQ.data_ptr(), p.q_sb = a.vecQ.stride(0), p.q_sh = a.vecQ.stride(1), p.q_sd = a.vecQ.stride(2);
  p.k = a.vecK.data_ptr(), p.k_sb = a.vecK.stride(0), p.k_sh = a.vecK.stride(1), p.k_sd = a.vecK.stride(2);
  p.v = a.vecV.data_ptr(), p.v_sb = a.vecV.stride(0), p.v_sh = a.vecV.stride(1), p.v_sd = a.vecV.stride(2);
  p.i = a.scaI.data_ptr<float>(), p.i_sb = a.scaI.stride(0), p.i_sh = a.scaI.stride(1);
  p.f = a.scaF.data_ptr<float>(), p.f_sb = a.scaF.stride(0), p.f_sh = a.scaF.stride(1);
  if (a.scaM.defined()) p.m = a.scaM.data_ptr<float>(), p.m_sb = a.scaM.stride(0), p.m_sh = a.scaM.stride(1);
  if (a.matC.defined()) {
    const at::Tensor& C = a.matC;
    p.C = C.data_ptr<float>();
    p.C_sb = C.stride(0), p.C_sh = C.stride(1), p.C_sr = C.stride(2), p.C_sc = C.stride(3);
    p.c_vec = (C.size(3) <= 1 || C.stride(3) == 1) && cuda::rows_aligned16(C, 2);
  }
  if (a.vecN.defined()) {
    p.n = a.vecN.data_ptr<float>(), p.n_sb = a.vecN.stride(0), p.n_sh = a.vecN.stride(1), p.n_sd = a.vecN.stride(2);
  }
  p.H = vecH.data_ptr();
  p.C_next = matC_next.data_ptr<float>();
  p.n_next = vecN_next.data_ptr<float>();
  p.m_next = scaM_next.data_ptr<float>();
  p.NH = NH, p.DHQK = DHQK, p.DHHV = DHHV;
  p.n_dvt = std::max<int64_t>(1, (DHHV + cuda::kStepCols - 1) / cuda::kStepCols);
  p.qk_scale = a.qk_scale, p.eps = a.eps;

  cuda::StepDtype dt = cuda::StepDtype::kFloat32;
  switch (a.vecQ.scalar_type()) {
    case at::kFloat: break;
    case at::kBFloat16: dt = cuda::StepDtype::kBFloat16; break;
    case at::kHalf: dt = cuda::StepDtype::kFloat16; break;
    default: TORCH_CHECK(false, "recurrent_step: unsupported dtype on CUDA: ", a.vecQ.scalar_type());
  }
  cuda::launch_step(p, B * NH, dt, c10::cuda::getCurrentCUDAStream());
}

}  // namespace mlstm
