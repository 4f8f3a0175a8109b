// CUDA entry of the fused backward kernels (backward.h, FusedBackwardTensors): when they serve
// the arguments, and the parameters of one launch on the caller's stream.
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "backward.h"
#include "cuda/bw_params.h"
#include "cuda/device_facts.h"

namespace mlstm {

bool fused_backward_cuda_usable(const BackwardArgs& a) {
  const char* env = std::getenv("MLSTM_EXT_FUSED_BACKWARD");
  if (env != nullptr && std::strcmp(env, "0") == 0) return false;
  const StatesArgs& s = a.fw.states;
  const at::ScalarType in = a.fw.matQ.scalar_type();
  // bw_post at L = 128 takes 218 KB of shared memory: Hopper has it, an A100 (163 KB) does not.
  return a.fw.matQ.is_cuda() && (in == at::kBFloat16 || in == at::kHalf) &&
         (s.L == 64 || s.L == 128) &&
         cuda::bw_fits(static_cast<int>(s.L), cuda::device_facts(a.fw.matQ.get_device()).smem_per_block_optin) &&
         s.vecI.scalar_type() == at::kFloat && s.DHQK > 0 &&
         s.DHHV > 0 && s.DHQK % cuda::kBwTile == 0 && s.DHHV % cuda::kBwTile == 0 &&
         s.NC > 0 && s.NC < (int64_t(1) << 30) && a.matDeltaH.defined() && (!a.exact || a.matH.defined());
}

// The chunk size the backward runs at. Like the forward (fused_fw_cuda.cpp), the backward is the
// same function of its inputs at every chunk size dividing S: vecN and vecM are per position and
// agree between chunk sizes up to rounding, so the forward's outputs at one chunk size serve the
// backward at another. MLSTM_EXT_BW_CHUNK (read at every call): "keep" the caller's, "64" or
// "128" where the fused kernels serve both sizes, else (default) the plan: chunk 128 at DHQK >
// 128 where the forward gave nsum (vecN_signed, as mlstm_chunkwise runs it). There half as many
// states (the recompute, the reverse scan and bw_post's C_k and G_{k+1} move half the bytes)
// outweigh the L x L work that doubles: H100, (4, 8, 8192, 256, 512) 5.47 -> 4.54 ms, and a third
// less peak memory (benchmarks/chunk_choice.py; NOTES.md, "Sixteenth session"). At DHQK <= 128
// chunk 64 was 3% faster than 128 but held 28% more memory, over Triton's peak: not taken. Given
// den, the backward forms nsum again from its own products to learn the branch of
// max(|nsum|, e^-m); that stays at the chunk size it was tested at.
BackwardArgs planned_backward_chunk(const BackwardArgs& a) {
  const char* env = std::getenv("MLSTM_EXT_BW_CHUNK");
  if (env != nullptr && std::strcmp(env, "keep") == 0) return a;
  const StatesArgs& s = a.fw.states;
  int64_t L = a.fw.vecN_signed && s.DHQK > 128 ? 128 : s.L;
  if (env != nullptr && (std::strcmp(env, "64") == 0 || std::strcmp(env, "128") == 0)) L = std::atoi(env);
  if (L == s.L || s.S % L != 0 || !fused_backward_cuda_usable(a)) return a;
  BackwardArgs b = a;
  b.fw.states.L = L, b.fw.states.NC = s.S / L;
  return fused_backward_cuda_usable(b) ? b : a;
}

void fused_backward_cuda(const FusedBackwardTensors& t, const BackwardArgs& a, bool post) {
  const StatesArgs& s = a.fw.states;
  auto f = [](const at::Tensor& x) { return x.data_ptr<float>(); };
  cuda::BwParams p{};
  p.q = t.Q.data_ptr(), p.k = t.K.data_ptr(), p.v = t.V.data_ptr();
  p.dh = t.dH.data_ptr(), p.h = t.H.data_ptr();
  p.igate = f(t.I), p.fgate = f(t.F), p.den = f(t.den), p.m = f(t.m);
  p.m_states = f(t.M_all), p.n_states = f(t.N_all);
  p.dnsum = f(t.dnsum), p.xn = f(t.Xn);
  p.qs = t.Qs.defined() ? t.Qs.data_ptr() : nullptr;
  p.qscale = t.qscale.defined() ? f(t.qscale) : nullptr;
  if (post) {
    p.c_states = t.C_all.data_ptr(), p.g_states = t.G.data_ptr(), p.gn = f(t.Gn), p.last_row = f(t.last_row);
    p.dq = t.dQ.data_ptr(), p.dk = t.dK.data_ptr(), p.dv = t.dV.data_ptr();
    p.di = f(t.dI), p.df = f(t.dF);
  }
  p.num_blocks = t.Q.size(0) * s.NC;
  p.S = s.S;
  p.NC = static_cast<int>(s.NC), p.L = static_cast<int>(s.L);
  p.DQ = static_cast<int>(s.DHQK), p.DV = static_cast<int>(s.DHHV);
  p.qk_scale = static_cast<float>(a.fw.qk_scale), p.eps = static_cast<float>(a.fw.eps);
  p.exact = a.exact;
  p.n_signed = a.fw.vecN_signed;
  // MLSTM_EXT_BW_PIPELINE (read at every call, for A/B in one process): 0 = bw_post's grams and
  // state products each wait for their own tiles with nothing in flight (as before the pipelines),
  // 1 = the grams pipelined only, unset or 2 = both. MLSTM_EXT_BW_AHEAD = 1 .. kStages - 1 sets
  // how many state-product steps are in flight ahead at level 2 (default: PostSmem<L>::kAhead).
  const char* pipe = std::getenv("MLSTM_EXT_BW_PIPELINE");
  const int level = pipe == nullptr ? 2 : std::atoi(pipe);
  const int max_ahead = cuda::bw_max_ahead(p.L);
  const char* ahead = std::getenv("MLSTM_EXT_BW_AHEAD");
  p.grams_pipelined = level >= 1;
  p.ahead = level < 2 ? 0 : ahead == nullptr ? cuda::bw_default_ahead(p.L) : std::clamp(std::atoi(ahead), 1, max_ahead);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (a.fw.matQ.scalar_type() == at::kBFloat16) {
    cuda::launch_bw_bf16(p, post, stream);
  } else {
    cuda::launch_bw_fp16(p, post, stream);
  }
}

}  // namespace mlstm
