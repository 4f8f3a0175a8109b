// CUDA backend entry of the H step: device guard and stream, params from the tensors, the plan
// (hintra_plan.cpp), one launch (hintra_launch.h).
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/device_facts.h"
#include "cuda/hintra_launch.h"
#include "cuda/tensor_layout.h"
#include "hintra.h"

namespace mlstm {
namespace {

cuda::InputType input_type(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16: return cuda::InputType::kBFloat16;
    case at::kHalf: return cuda::InputType::kFloat16;
    case at::kFloat: return cuda::InputType::kFloat32;
    default:
      TORCH_CHECK(false, "parallel_fw_hintra: matQ of dtype ", t, " has no CUDA kernel");
  }
}

}  // namespace

void hintra_cuda(const HintraArgs& a, at::Tensor& matH, at::Tensor& vecN, at::Tensor& vecM) {
  check_not_float64_on_cuda("parallel_fw_hintra", "matQ", a.matQ);
  const cuda::InputType type = input_type(a.matQ.scalar_type());
  TORCH_CHECK(a.DHQK < (1 << 20) && a.DHHV < (1 << 20) && a.L < (1 << 30),
              "parallel_fw_hintra: head dims must be < 2^20 and chunk_size < 2^30 on CUDA");
  const c10::cuda::CUDAGuard guard(a.matQ.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const at::Tensor q = cuda::unit_last_stride(a.matQ), k = cuda::unit_last_stride(a.matK),
                   v = cuda::unit_last_stride(a.matV);
  // The kernels read states as float32 (a copy only for other dtypes); gates are float32
  // (check_hintra_args), vecN / vecM float32 (allocate_hintra_outputs).
  const at::Tensor C = cuda::unit_last_stride(a.matC_all.to(at::kFloat));
  const at::Tensor n = a.vecN_all.to(at::kFloat), m = a.scaM_all.to(at::kFloat);
  const at::Tensor &vi = a.vecI, &vf = a.vecF;

  const cuda::HintraShape shape{a.B * a.NH, a.NC, static_cast<int>(a.DHQK), static_cast<int>(a.DHHV),
                                static_cast<int>(a.L)};
  const int dv_hint = a.siz_b_DHHV.has_value() ? static_cast<int>(std::min<int64_t>(*a.siz_b_DHHV, 1 << 20)) : 0;
  const cuda::HintraPlan plan = cuda::plan_hintra(shape, type, dv_hint, cuda::device_facts(a.matQ.get_device()),
                                                  cuda::sm90_enabled());

  cuda::HintraParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_sb = q.stride(0), p.q_sh = q.stride(1), p.q_ss = q.stride(2);
  p.k_sb = k.stride(0), p.k_sh = k.stride(1), p.k_ss = k.stride(2);
  p.v_sb = v.stride(0), p.v_sh = v.stride(1), p.v_ss = v.stride(2);
  p.igate = vi.data_ptr<float>();
  p.i_sb = vi.stride(0), p.i_sh = vi.stride(1), p.i_ss = vi.stride(2);
  p.fgate = vf.data_ptr<float>();
  p.f_sb = vf.stride(0), p.f_sh = vf.stride(1), p.f_ss = vf.stride(2);
  p.C = C.data_ptr<float>();
  p.C_sb = C.stride(0), p.C_sh = C.stride(1), p.C_sr = C.stride(2);
  p.n = n.data_ptr<float>();
  p.n_sb = n.stride(0), p.n_sh = n.stride(1), p.n_sr = n.stride(2);
  p.m = m.data_ptr<float>();
  p.m_sb = m.stride(0), p.m_sh = m.stride(1), p.m_ss = m.stride(2);
  p.H = matH.data_ptr();
  p.vecN = vecN.data_ptr<float>();
  p.vecM = vecM.data_ptr<float>();
  p.NH = a.NH;
  p.S = a.S;
  p.DHQK = shape.DHQK, p.DHHV = shape.DHHV, p.L = shape.L;
  p.NC = static_cast<int>(a.NC);
  p.qk_scale = static_cast<float>(a.qk_scale);
  p.eps = static_cast<float>(a.eps);
  p.n_signed = a.vecN_signed;
  p.q_vec = cuda::rows_aligned16(q, 2);
  p.k_vec = cuda::rows_aligned16(k, 2);
  p.v_vec = cuda::rows_aligned16(v, 2);
  p.c_vec = cuda::rows_aligned16(C, 2);
  p.rows_per_block = plan.rows_per_block;
  p.n_qt = plan.n_qt;
  p.n_dvt = plan.n_dvt;

  switch (type) {
    case cuda::InputType::kBFloat16: cuda::launch_hintra<__nv_bfloat16>(p, plan, stream); break;
    case cuda::InputType::kFloat16: cuda::launch_hintra<__half>(p, plan, stream); break;
    case cuda::InputType::kFloat32: cuda::launch_hintra<float>(p, plan, stream); break;
  }
}

}  // namespace mlstm
