// Kernel 1 of recurrent_fw_states (see states_params.h): per chunk, a[s] = (g_k - bg[s]) + vecI[kL+s]
// for every position s and the pair (g_k, max_s a[s]). One warp per chunk, any L.
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include "common.h"
#include "cuda/states_kernel.cuh"

namespace mlstm::cuda {

// g_k - bg[s] = sum of logsigmoid(f) over the positions after s: a reverse scan over pieces of 32
// positions from the chunk's end, never a difference of prefix sums (f = -1e30 at position r
// would otherwise absorb every other term of bg[s] for s >= r, losing them in g_k - bg[s]).
__global__ void __launch_bounds__(32 * kGateWarps) states_gates_kernel(const StatesGateParams p) {
  constexpr unsigned kFull = 0xffffffffu;
  const int lane = threadIdx.x % 32;
  const int64_t chunk_id = static_cast<int64_t>(blockIdx.x) * kGateWarps + threadIdx.x / 32;
  if (chunk_id >= p.num_chunks) return;  // the whole warp leaves together
  const int64_t bh = chunk_id / p.NC, b = bh / p.NH, h = bh % p.NH;
  const int64_t s0 = (chunk_id % p.NC) * p.L;  // first position of the chunk
  const float* gi = p.igate + b * p.i_sb + h * p.i_sh + s0 * p.i_ss;
  const float* gf = p.fgate + b * p.f_sb + h * p.f_sh + s0 * p.f_ss;
  float* a_out = p.a + bh * p.S + s0;

  // Lane `lane` of the piece ending (exclusive) at `end` holds position end - 32 + lane.
  auto fetch = [&](int end, float& f, float& i) {
    const int s = end - 32 + lane;
    f = s >= 0 ? gf[s * p.f_ss] : 0.f;
    i = s >= 0 ? gi[s * p.i_ss] : 0.f;
  };
  float f, iv;
  fetch(p.L, f, iv);
  float after_piece = 0.f;  // sum of logsigmoid(f) after the current piece
  float amax = -INFINITY;
  for (int end = p.L; end > 0; end -= 32) {
    float f_next = 0.f, i_next = 0.f;
    if (end > 32) fetch(end - 32, f_next, i_next);  // the next piece's loads in flight meanwhile
    const int s = end - 32 + lane;
    float incl = s >= 0 ? log_forget(f) : 0.f;  // becomes the sum over lanes lane..31
#pragma unroll
    for (int off = 1; off < 32; off *= 2) {
      const float y = __shfl_down_sync(kFull, incl, off);
      if (lane + off < 32) incl += y;
    }
    float after = __shfl_down_sync(kFull, incl, 1);  // lanes lane+1..31
    if (lane == 31) after = 0.f;
    const float av = (after + after_piece) + iv;
    if (s >= 0) {
      a_out[s] = av;
      amax = nan_max(amax, av);
    }
    after_piece += __shfl_sync(kFull, incl, 0);
    f = f_next;
    iv = i_next;
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) amax = nan_max(amax, __shfl_xor_sync(kFull, amax, off));
  if (lane == 0) p.gm[chunk_id] = make_float2(after_piece, amax);  // after_piece is now g_k
}

void launch_states_gates(const StatesGateParams& p, cudaStream_t stream) {
  const int64_t blocks = (p.num_chunks + kGateWarps - 1) / kGateWarps;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "recurrent_fw_states: ", num(p.num_chunks),
              " chunks (B*NH*NC) exceed the CUDA grid limit of the gate kernel; split the batch");
  if (blocks == 0) return;
  states_gates_kernel<<<static_cast<unsigned>(blocks), 32 * kGateWarps, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace mlstm::cuda
