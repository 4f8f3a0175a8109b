// The reverse state scan of the backward (scan_params.h). One thread per state entry e of one
// pair g walks the chunks from last to first: memory-bound, per chunk one read of X and of the
// state and one write of X, coalesced along e. Each warp writes its own partial of
// <state k, G_{k+1}>, so the loop needs no block-wide synchronisation.
#include <c10/cuda/CUDAException.h>

#include "cuda/mma.cuh"
#include "cuda/scan_params.h"

namespace mlstm::cuda {
namespace {

// Loads for kAhead chunks are issued before the dependent updates: the chain through `prev` would
// otherwise leave one global load in flight per thread.
constexpr int kAhead = 8;

__global__ void __launch_bounds__(kScanThreads) reverse_state_scan_kernel(const ScanParams p) {
  const int64_t g = blockIdx.x / p.blocks_per_pair, block = blockIdx.x % p.blocks_per_pair;
  const int64_t e = block * kScanThreads + threadIdx.x;
  const bool live = e < p.E;
  const int64_t warp = block * kScanWarps + threadIdx.x / 32;
  float* X = p.X + g * p.NC * p.E + e;
  const float* st = p.states + g * p.states_stride_g + e;
  const float* decay = p.decay + g * p.NC;
  float prev = (live && p.last != nullptr) ? p.last[g * p.E + e] : 0.f;
  for (int64_t k0 = p.NC - 1; k0 >= 0; k0 -= kAhead) {
    float xs[kAhead], ss[kAhead], ds[kAhead];
#pragma unroll
    for (int j = 0; j < kAhead; ++j) {
      const int64_t k = k0 - j;
      xs[j] = (live && k >= 0) ? X[k * p.E] : 0.f;
      ss[j] = (live && k >= 0) ? st[k * p.E] : 0.f;
      ds[j] = k >= 0 ? decay[k] : 0.f;
    }
#pragma unroll
    for (int j = 0; j < kAhead; ++j) {
      const int64_t k = k0 - j;
      if (k < 0) break;  // the same k for every thread: no divergence
      float dot = ss[j] * prev;
      if (live) X[k * p.E] = prev;
      prev = fmaf(ds[j], prev, xs[j]);
#pragma unroll
      dot = warp_sum(dot);
      if ((threadIdx.x & 31) == 0) p.dots[(g * p.NC + k) * p.warps_per_pair + warp] = dot;
    }
  }
  if (live) p.first[g * p.E + e] = prev;
}

}  // namespace

void launch_reverse_state_scan(const ScanParams& p, cudaStream_t stream) {
  const int64_t blocks = p.G * p.blocks_per_pair;
  if (blocks == 0) return;
  reverse_state_scan_kernel<<<static_cast<unsigned>(blocks), kScanThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace mlstm::cuda
