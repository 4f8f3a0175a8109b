// CUDA backend entry of mlstm::recurrent_fw_states: device guard, current stream, input layout,
// the two kernels (gates, then states; csrc/cuda/states_params.h describes them).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <climits>
#include <cstdlib>
#include <cstring>

#include "cuda/device_facts.h"
#include "cuda/states_host.h"
#include "cuda/states_params.h"
#include "cuda/tensor_layout.h"
#include "states.h"

namespace mlstm {
namespace {

// Two warps per strip (StatesTraits kSplit = 2) when the grid has at most two blocks per SM: one
// warp per strip would then leave the SMs under 16 warps, while 8-warp blocks still run in one
// wave. MLSTM_EXT_STATES_SPLIT=0 / 1 (read at every call) forces one way, for tests and A/B.
bool states_split(int64_t blocks, int device) {
  const char* env = std::getenv("MLSTM_EXT_STATES_SPLIT");
  if (env != nullptr && (std::strcmp(env, "0") == 0 || std::strcmp(env, "1") == 0)) return env[0] == '1';
  return blocks <= 2 * static_cast<int64_t>(cuda::device_facts(device).sm_count);
}

}  // namespace

namespace cuda {

std::pair<at::Tensor, at::Tensor> run_states_gates(const StatesArgs& a, cudaStream_t stream) {
  const int64_t num_bh = a.B * a.NH;
  const auto f32 = a.matK.options().dtype(at::kFloat);
  at::Tensor abuf = at::empty({num_bh, a.S}, f32);
  at::Tensor gm = at::empty({num_bh, a.NC, 2}, f32);
  if (num_bh * a.NC > 0) {
    StatesGateParams g{};
    g.igate = a.vecI.data_ptr<float>();
    g.i_sb = a.vecI.stride(0), g.i_sh = a.vecI.stride(1), g.i_ss = a.vecI.stride(2);
    g.fgate = a.vecF.data_ptr<float>();
    g.f_sb = a.vecF.stride(0), g.f_sh = a.vecF.stride(1), g.f_ss = a.vecF.stride(2);
    g.a = abuf.data_ptr<float>();
    g.gm = reinterpret_cast<float2*>(gm.data_ptr<float>());
    g.NH = a.NH;
    g.S = a.S;
    g.num_chunks = num_bh * a.NC;
    g.L = static_cast<int>(a.L);
    g.NC = static_cast<int>(a.NC);
    launch_states_gates(g, stream);
  }
  return {abuf, gm};
}

}  // namespace cuda

void states_cuda(const StatesArgs& a, at::Tensor& matC_all, at::Tensor& vecN_all, at::Tensor& scaM_all) {
  check_not_float64_on_cuda("recurrent_fw_states", "matK", a.matK);
  TORCH_CHECK(a.DHQK < INT_MAX && a.DHHV < INT_MAX && a.L < INT_MAX && a.NC < INT_MAX,
              "recurrent_fw_states: DHQK, DHHV, chunk_size and S / chunk_size must each be below "
              "2^31 on CUDA; got DHQK = ", num(a.DHQK), ", DHHV = ", num(a.DHHV), ", chunk_size = ",
              num(a.L), ", NC = ", num(a.NC));
  using Tiles = cuda::StatesTraits<float>;  // the tile shape is the same for every dtype
  // The kernel counts its steps (NC * ceil(L / kBL); float32 has the shortest step) in an int.
  TORCH_CHECK(a.NC * ((a.L + Tiles::kBL - 1) / Tiles::kBL) < INT_MAX,
              "recurrent_fw_states: sequence too long for the CUDA kernel's step counter (S = ",
              num(a.S), ", chunk_size = ", num(a.L), ")");
  const c10::cuda::CUDAGuard guard(a.matK.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const at::Tensor k = cuda::unit_last_stride(a.matK), v = cuda::unit_last_stride(a.matV);
  // Gates and initial states are float32 already (check_states_args), in the caller's strides.
  const int64_t num_bh = a.B * a.NH;

  // Kernel 1: a[s] and (g_k, max_s a[s]) for every chunk.
  auto [abuf, gm] = cuda::run_states_gates(a, stream);

  // Kernel 2: the states.
  cuda::StatesParams p{};
  p.k = k.data_ptr();
  p.k_sb = k.stride(0), p.k_sh = k.stride(1), p.k_ss = k.stride(2);
  p.v = v.data_ptr();
  p.v_sb = v.stride(0), p.v_sh = v.stride(1), p.v_ss = v.stride(2);
  p.a = abuf.data_ptr<float>();
  p.gm = reinterpret_cast<const float2*>(gm.data_ptr<float>());
  cuda::set_initial_states(p, a);
  // Outputs: allocated contiguous by the op.
  TORCH_INTERNAL_ASSERT(matC_all.is_contiguous() && vecN_all.is_contiguous() && scaM_all.is_contiguous());
  // C in float32 (the op), or in the 16-bit input dtype (the backward's recompute, whose kernels
  // multiply C in that dtype: rounded once here instead of when each reads it).
  p.c16 = matC_all.scalar_type() != at::kFloat;
  TORCH_INTERNAL_ASSERT(!p.c16 || (matC_all.scalar_type() == a.matK.scalar_type() &&
                                   (a.matK.scalar_type() == at::kBFloat16 || a.matK.scalar_type() == at::kHalf)));
  p.C = matC_all.data_ptr();
  p.n = vecN_all.data_ptr<float>();
  p.m = scaM_all.data_ptr<float>();
  p.NH = a.NH;
  p.S = a.S;
  p.DHQK = static_cast<int>(a.DHQK);
  p.DHHV = static_cast<int>(a.DHHV);
  p.L = static_cast<int>(a.L);
  p.NC = static_cast<int>(a.NC);
  // At least one tile each way: with DHQK = 0 or DHHV = 0 the block of tile (0, 0) still writes m.
  p.n_qkt = static_cast<int>(std::max<int64_t>(1, (a.DHQK + Tiles::kBQK - 1) / Tiles::kBQK));
  p.n_hvt = static_cast<int>(std::max<int64_t>(1, (a.DHHV + Tiles::kBHV - 1) / Tiles::kBHV));
  p.k_vec = cuda::rows_aligned16(k, 2);
  p.v_vec = cuda::rows_aligned16(v, 2);
  p.split = states_split(num_bh * p.n_qkt * p.n_hvt, a.matK.get_device());

  switch (a.matK.scalar_type()) {
    case at::kBFloat16: cuda::launch_states_bf16(p, num_bh, stream); break;
    case at::kHalf: cuda::launch_states_fp16(p, num_bh, stream); break;
    case at::kFloat: cuda::launch_states_fp32(p, num_bh, stream); break;
    default: TORCH_CHECK(false, "recurrent_fw_states: unsupported dtype on CUDA: ", a.matK.scalar_type());
  }
}

}  // namespace mlstm
