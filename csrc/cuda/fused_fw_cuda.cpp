// CUDA entry of the fused forward (fused_fw_params.h): whether it applies, then the states' gate
// kernel (a[s], (g_k, max a)) and the one fused launch on the caller's stream.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <cstring>

#include "cuda/device_facts.h"
#include "cuda/fused_fw_params.h"
#include "cuda/states_host.h"
#include "cuda/tensor_layout.h"
#include "forward.h"

namespace mlstm {
namespace {

// MLSTM_EXT_FUSED_FW (read at every call): "0" never, "1" wherever the kernel applies (chunk 64
// with DHQK up to 256, chunk 128 with DHQK up to 128; any sm_80+ device with the shared memory),
// else (default) where it measured faster than the two kernels: chunk 64 on compute capability
// 9.x (thirteenth session, against the two kernels: H200 0.736 -> 0.579 ms at (8, 16, 4096, 128,
// 128, 64) and 2.435 -> 2.303 ms at (4, 8, 8192, 256, 512, 64), H100 2.558 -> 2.275 ms there;
// chunk 128 runs as chunk 64, below; benchmarks/NOTES.md), and only where its grid fills the
// GPU's block slots (fused_pays).
enum class FusedMode { kOff, kOn, kDefault };
FusedMode fused_mode() {
  const char* env = std::getenv("MLSTM_EXT_FUSED_FW");
  if (env != nullptr && std::strcmp(env, "0") == 0) return FusedMode::kOff;
  if (env != nullptr && std::strcmp(env, "1") == 0) return FusedMode::kOn;
  return FusedMode::kDefault;
}

// Whether the fused kernel beats the two kernels on a grid of `blocks` (`per_sm` fit on an SM).
// Each fused block walks every chunk of its (b*h, DHHV tile) in order, so its time goes by
// waves, while the two kernels spread over the chunks and go by blocks: a grid that leaves SMs
// idle (batch 1 at xLSTM-7B's 8 heads: 64 blocks for 132 SMs) or a last wave mostly empty runs
// as long as full waves. Break-even measured on the H100 (fourteenth session, benchmarks/NOTES.md):
// ~84% of a wave with one block per SM; with two per SM ~67% of the slots, but a grid of at most
// one block per SM runs each block 1.36x faster (0.423 against 0.576 ms), so there ~95% of the SMs.
bool fused_pays(int64_t blocks, int64_t sms, int per_sm) {
  const auto fills = [blocks](int64_t slots, int64_t pct) {
    const int64_t waves = (blocks + slots - 1) / slots;
    return 100 * blocks >= pct * waves * slots;
  };
  if (per_sm == 1) return fills(sms, 85);
  return blocks <= sms ? 100 * blocks >= 95 * sms : fills(per_sm * sms, 70);
}

}  // namespace

// The two kernels' chunk size where the fused kernel did not run (default plan, 16-bit inputs on
// Hopper): chunk 64 runs as chunk 128 where S allows, the same function up to rounding (above).
// The H step and the states at 128 hold and move half the states: H100, sixteenth session,
// 1.492 -> 1.407 ms at (1, 8, 16384, 256, 512) (batch 1 at xLSTM-7B's heads, where the fused
// kernel leaves SMs idle) and 0.847 -> 0.746 at (8, 16, 4096, 128, 128) (benchmarks/chunk_choice.py).
ForwardArgs planned_two_step_chunk(const ForwardArgs& f) {
  const StatesArgs& s = f.states;
  const at::ScalarType dt = f.matQ.scalar_type();
  if (fused_mode() != FusedMode::kDefault || s.L != 64 || s.S % 128 != 0 || (dt != at::kBFloat16 && dt != at::kHalf) ||
      cuda::device_facts(f.matQ.get_device()).cc_major != 9) {
    return f;
  }
  ForwardArgs g = f;
  g.states.L = 128, g.states.NC = s.S / 128;
  return g;
}

bool fused_forward_cuda(const ForwardArgs& f, ForwardOutputs& out) {
  const FusedMode mode = fused_mode();
  // The default plan runs chunk 128 as chunk 64: the chunkwise forward is the same function of its
  // inputs at every chunk size (each row's m is the max over the same log weights however the
  // chunks split them; every output agrees to 1e-14 in float64 between chunk 32, 64 and 128), so
  // only the rounding differs, and the chunk-64 kernel is the faster one (H200, thirteenth
  // session: 0.579 against 0.761 ms fused at chunk 128 on the same inputs' sizes; H100, fourteenth:
  // 0.744 -> 0.576 ms at (8, 16, 4096, 128, 128, 128) against the two kernels at chunk 128).
  StatesArgs a = f.states;
  if (mode == FusedMode::kDefault && a.L == 128) a.L = 64, a.NC *= 2;
  const at::ScalarType dt = f.matQ.scalar_type();
  const bool shape_ok = (a.L == 64 && a.DHQK <= 256) || (a.L == 128 && a.DHQK <= 128);
  if (mode == FusedMode::kOff || (dt != at::kBFloat16 && dt != at::kHalf) || !shape_ok || a.DHQK < 1 ||
      a.DHHV < 1 || a.NC < 1 || a.NC >= INT_MAX || a.DHHV >= (1 << 20)) {
    return false;
  }
  const int L = static_cast<int>(a.L);
  const int dqk_cap = a.DHQK <= 128 ? 128 : 256;
  const int smem = cuda::fused_fw_smem_bytes(dqk_cap, L);
  const cuda::DeviceFacts& dev = cuda::device_facts(f.matQ.get_device());
  const int n_dvt = static_cast<int>((a.DHHV + 63) / 64);
  const int64_t blocks = a.B * a.NH * n_dvt;
  if (dev.cc_major < 8 || dev.smem_per_block_optin < smem || blocks >= INT_MAX) return false;
  if (mode == FusedMode::kDefault) {  // L is 64 here (chunk 128 was mapped above)
    const int per_sm = std::max(1, std::min(cuda::fused_fw_blocks_per_sm(dqk_cap, L), dev.smem_per_sm / (smem + 1024)));
    if (dev.cc_major != 9 || !fused_pays(blocks, dev.sm_count, per_sm)) return false;
  }

  const c10::cuda::CUDAGuard guard(f.matQ.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor q = cuda::unit_last_stride(f.matQ), k = cuda::unit_last_stride(a.matK),
                   v = cuda::unit_last_stride(a.matV);
  const auto f32 = f.matQ.options().dtype(at::kFloat);

  // The states' gates (states_gates.cu): a[s] and (g_k, max_s a[s]) per chunk; the H rows' gate
  // terms that do not depend on the state (fused_fw_gates.cu), per chunk.
  auto [abuf, gm] = cuda::run_states_gates(a, stream);
  at::Tensor hg = at::empty({a.B * a.NH * a.NC, cuda::fused_gate_floats(L)}, f32);
  {
    cuda::FusedGateParams g{};
    g.igate = a.vecI.data_ptr<float>();
    g.i_sb = a.vecI.stride(0), g.i_sh = a.vecI.stride(1), g.i_ss = a.vecI.stride(2);
    g.fgate = a.vecF.data_ptr<float>();
    g.f_sb = a.vecF.stride(0), g.f_sh = a.vecF.stride(1), g.f_ss = a.vecF.stride(2);
    g.hg = hg.data_ptr<float>();
    g.NH = a.NH, g.num_chunks = a.B * a.NH * a.NC, g.L = L, g.NC = static_cast<int>(a.NC);
    cuda::launch_fused_fw_gates(g, stream);
  }

  at::Tensor matH = at::empty({a.B, a.NH, a.S, a.DHHV}, f.matQ.options());
  at::Tensor vecN = at::empty({a.B, a.NH, a.S}, f32), vecM = at::empty({a.B, a.NH, a.S}, f32);
  at::Tensor C_last = at::empty({a.B, a.NH, a.DHQK, a.DHHV}, f32);
  at::Tensor n_last = at::empty({a.B, a.NH, a.DHQK}, f32), m_last = at::empty({a.B, a.NH}, f32);

  cuda::FusedFwParams p{};
  cuda::HintraParams& h = p.h;
  h.q = q.data_ptr(), h.k = k.data_ptr(), h.v = v.data_ptr();
  h.q_sb = q.stride(0), h.q_sh = q.stride(1), h.q_ss = q.stride(2);
  h.k_sb = k.stride(0), h.k_sh = k.stride(1), h.k_ss = k.stride(2);
  h.v_sb = v.stride(0), h.v_sh = v.stride(1), h.v_ss = v.stride(2);
  h.igate = a.vecI.data_ptr<float>();
  h.i_sb = a.vecI.stride(0), h.i_sh = a.vecI.stride(1), h.i_ss = a.vecI.stride(2);
  h.fgate = a.vecF.data_ptr<float>();
  h.f_sb = a.vecF.stride(0), h.f_sh = a.vecF.stride(1), h.f_ss = a.vecF.stride(2);
  h.H = matH.data_ptr(), h.vecN = vecN.data_ptr<float>(), h.vecM = vecM.data_ptr<float>();
  h.NH = a.NH, h.S = a.S;
  h.DHQK = static_cast<int>(a.DHQK), h.DHHV = static_cast<int>(a.DHHV), h.L = L;
  h.NC = static_cast<int>(a.NC);
  h.rows_per_block = L, h.n_qt = 1, h.n_dvt = n_dvt;
  h.qk_scale = static_cast<float>(f.qk_scale), h.eps = static_cast<float>(f.eps);
  h.n_signed = f.vecN_signed;
  h.q_vec = cuda::rows_aligned16(q, 2), h.k_vec = cuda::rows_aligned16(k, 2), h.v_vec = cuda::rows_aligned16(v, 2);
  p.a = abuf.data_ptr<float>();
  p.gm = reinterpret_cast<const float2*>(gm.data_ptr<float>());
  p.hg = hg.data_ptr<float>();
  cuda::set_initial_states(p, a);
  p.C_last = C_last.data_ptr<float>(), p.n_last = n_last.data_ptr<float>(), p.m_last = m_last.data_ptr<float>();
  p.n_dvt = n_dvt;

  if (dt == at::kBFloat16) {
    cuda::launch_fused_fw_bf16(p, dqk_cap, L, blocks, stream);
  } else {
    cuda::launch_fused_fw_fp16(p, dqk_cap, L, blocks, stream);
  }
  out = {matH, C_last, n_last, m_last, vecN, vecM};
  return true;
}

}  // namespace mlstm
