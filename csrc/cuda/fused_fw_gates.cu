// The fused forward's gate terms (fused_fw_params.h, fused_gate_floats): for every chunk at once,
// the parts of SPEC.md steps 1-4 that do not depend on the state (the prefix sums, the intra-chunk
// maxima, the column terms), with stage_gates' own functions (hintra_common.cuh), so the fused
// kernel's chunk loop needs no gate scan and none of its barriers. One warp per chunk, any L.
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include "common.h"
#include "cuda/fused_fw_params.h"
#include "cuda/hintra_common.cuh"
#include "cuda/states_params.h"

namespace mlstm::cuda {

__global__ void __launch_bounds__(32 * kGateWarps) fused_fw_gates_kernel(const FusedGateParams p) {
  const int lane = threadIdx.x % 32;
  const int64_t chunk_id = static_cast<int64_t>(blockIdx.x) * kGateWarps + threadIdx.x / 32;
  if (chunk_id >= p.num_chunks) return;  // the whole warp leaves together
  const int64_t bh = chunk_id / p.NC, b = bh / p.NH, h = bh % p.NH;
  const int64_t s0 = (chunk_id % p.NC) * p.L;
  const float* gi = p.igate + b * p.i_sb + h * p.i_sh + s0 * p.i_ss;
  const float* gf = p.fgate + b * p.f_sb + h * p.f_sh + s0 * p.f_ss;
  const int L = p.L;
  float* out = p.hg + chunk_id * fused_gate_floats(L);
  GateScratch gs{};  // its key arrays in global memory (the row arrays stay unused)
  gs.bg = out, gs.bg_lo = out + L, gs.col_a = out + 2 * L, gs.col_b = out + 3 * L;
  float* m_intra = out + 4 * L;

  const float big = scan_gates_warp<true>(gs, L, [&](int s) { return log_forget(gf[s * p.f_ss]); },
                                          [&](int s) { return gi[s * p.i_ss]; });
  const bool wide = __any_sync(0xffffffffu, big > kWideGate);
  __syncwarp();  // the scan's stores, visible to the whole warp
  for (int t = lane; t < L; t += 32) m_intra[t] = m_intra_of(gs, t, wide);
  __syncwarp();  // every row has read the prefix max
  for (int s = lane; s < L; s += 32) column_exponents(gs, s, wide);
  if (lane < 4) out[5 * L + lane] = (lane == 0 && wide) ? 1.f : 0.f;
}

void launch_fused_fw_gates(const FusedGateParams& p, cudaStream_t stream) {
  const int64_t blocks = (p.num_chunks + kGateWarps - 1) / kGateWarps;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "chunkwise_fw: ", num(p.num_chunks),
              " chunks (B*NH*NC) exceed the CUDA grid limit of the gate kernel; split the batch");
  if (blocks == 0) return;
  fused_fw_gates_kernel<<<static_cast<unsigned>(blocks), 32 * kGateWarps, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace mlstm::cuda
